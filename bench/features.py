"""The feature pass against the bare forward pass stopped at the coder's layer, on the embedded
model, in the same run over the same text: tokens/s of each and their ratio, for TopK coders of
4,608 and 32,768 latents (k 32) on blocks.6.hook_resid_post. The issue's target: a ratio of at
least 0.8. The pass is `interp.features.stream_features` as `interp features` runs it (model,
encode, top contexts, samples, histograms, checkpoints); its fixed costs (the logit lens, once per
coder, and the token strings) are printed apart. Untrained coders (the encoder starts as the
decoder's transpose) fire spread over all latents, which is the bookkeeping's hard case; pass
--run to time trained coders instead. The selection's precision is the pass's default (`auto`:
the faster of bfloat16 and float32 here), and the dense encoder product alone is timed too: the
ratio no exact encode can pass on this machine.

    python bench/features.py [--tokens 100000] [--latents 4608 32768] [--rounds 2] [--run RUN_DIR ...]

The forward and the pass are timed in alternating rounds and the best of each kept: a shared
2-core machine's speed drifts by a third between minutes, which one round of each reads as a
change of the ratio.

Then what `interp serve` does with the results: the index built once (its size) and a feature
page's data read from disk; and the bfloat16 selection's agreement with float32 selection on one batch: the fraction of
tokens whose chosen latents are the same set, and the fraction of firings kept.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from timing import timed

from interp.dashboard import feature_data, index_data
from interp.data import DataConfig
from interp.features import (
    FeatureConfig,
    FeatureResults,
    coder_info,
    load_features,
    logit_lens,
    selection_dtype,
    stream_features,
    token_strings,
)
from interp.hooks import capture
from interp.models import load_model
from interp.sae import create_coder, load_sae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--latents", type=int, nargs="+", default=[4608, 32768])
    parser.add_argument("--run", type=Path, nargs="*", default=[], help="trained coders to time instead of untrained ones")
    parser.add_argument("--hook", default="blocks.6.hook_resid_post")
    parser.add_argument("--rounds", type=int, default=2, help="alternating timings of the forward and the pass; the best of each counts")
    args = parser.parse_args()
    model = load_model()
    data = DataConfig()
    coders = [load_sae(run) for run in args.run] or [
        create_coder("topk", d_in=model.cfg.d_model, n_latents=n, k=32, hook=args.hook, model="smollm2-135m") for n in args.latents
    ]
    print(f"{args.tokens:,} tokens of the built-in corpus, batches of {data.model_batch} x {data.context_size}; torch threads {torch.get_num_threads()}")
    for coder in coders:
        bench_coder(model, data, coder, args.tokens, args.rounds)


def bench_coder(model, data: DataConfig, coder, tokens: int, rounds: int) -> None:
    hook = coder.cfg.hook
    cfg = FeatureConfig(tokens=tokens, data=data)
    batches = data.batches(model.tokenizer, "train")
    first = next(batches)
    # One batch's activations, once: the warm-up, and the input of the product's timing and of the
    # bfloat16 check below.
    first_x = capture(model, first.tokens_bt, [hook], first.mask_bt)[hook]

    def forward():
        done = 0
        for batch in data.batches(model.tokenizer, "train"):
            if done >= tokens:
                return done
            done += len(capture(model, batch.tokens_bt, [hook], batch.mask_bt)[hook])
        return done

    with tempfile.TemporaryDirectory() as scratch:
        forward_s = pass_s = float("inf")
        for round_ in range(rounds):
            done, seconds = timed(forward)
            forward_s = min(forward_s, seconds)
            # A checkpoint of its own each round: the pass would resume from the last one's.
            checkpoint = Path(scratch) / f"partial-{round_}.safetensors"
            state, seconds = timed(lambda path=checkpoint: stream_features(model, coder, cfg, progress=False, checkpoint=path))
            pass_s = min(pass_s, seconds)
        (lens, lens_s), (vocab, vocab_s) = timed(lambda: logit_lens(model, coder, cfg.logit_tokens)), timed(lambda: token_strings(model))
        F, P = done / forward_s, state.tokens / pass_s
        dtype = selection_dtype(cfg.selection, coder.W_enc.device)
        print(f"{coder.arch} {coder.cfg.n_latents:>6} latents: stopped forward {F:7.0f} tok/s, feature pass {P:7.0f} tok/s, "
              f"ratio {P / F:.2f}; fixed costs: logit lens {lens_s:.1f} s, token strings {vocab_s:.1f} s")
        # The one product no exact TopK encode avoids: the ratio the pass could reach if nothing
        # else (selection, bookkeeping) cost anything.
        with torch.no_grad():
            x = coder.encoder_input(coder.normalized_input(first_x))
            coder.preacts(x, dtype)
            _, product_s = timed(lambda: [coder.preacts(x, dtype) for _ in range(3)])
        product_per_token = product_s / 3 / len(x)
        print(f"  selection in {str(dtype).removeprefix('torch.')}: the dense encoder product alone {len(x) / (product_s / 3):7.0f} tok/s, "
              f"bounding the ratio at {1 / (1 + F * product_per_token):.2f}")
        # What `interp serve` answers from these results: the index once, each feature on demand.
        FeatureResults(cfg, coder_info(coder), state.tokens, vocab, state.tensors() | (lens or {})).save(scratch)
        served = load_features(scratch, on_demand=True)
        index, index_s = timed(lambda: json.dumps(index_data(served)))
        ids = served.density_n.argsort(descending=True)[:: max(1, coder.cfg.n_latents // 20)][:20].tolist()
        _, pages_s = timed(lambda: [json.dumps(feature_data(served, f)) for f in ids])
        print(f"  served: index of {len(json.loads(index)['ids']):,} features {len(index) / 1e6:.1f} MB built in {index_s:.2f} s; "
              f"a feature page's data {pages_s / len(ids) * 1000:.0f} ms (mean of {len(ids)}, read from disk)")
    with torch.no_grad():
        exact, fast = coder.eval().encode(first_x), coder.encode(first_x, select_dtype=torch.bfloat16)
    same = (exact.indices_bk.sort(1).values == fast.indices_bk.sort(1).values).all(1).float().mean()
    exact_set = {(t, int(f)) for t, row in enumerate(exact.indices_bk) for f in row if f >= 0}
    kept = sum((t, int(f)) in exact_set for t, row in enumerate(fast.indices_bk) for f in row if f >= 0) / max(len(exact_set), 1)
    print(f"  bfloat16 selection: {float(same):.3f} of tokens choose the same latents as float32, {kept:.4f} of firings kept")


if __name__ == "__main__":
    main()
