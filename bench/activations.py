"""Activation caching throughput against the bare model forward pass, in the same run.

    python bench/activations.py [--model smollm2-135m] [--hook blocks.6.hook_resid_post] [--batches 8]

Prints the model's (cached) load time, then tokens/s of: the bare forward stopped after the hooked
block, our capture (hooks + BOS removal + flattening), and writing an on-disk store; the last
line gives their ratios.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from interp.activation_store import StoreManifest, write_store
from interp.activations import ModelChunks
from interp.data import iter_texts, iter_token_batches
from interp.hooks import capture
from interp.models import load_model, stop_layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--hook", default="blocks.6.hook_resid_post")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--context-size", type=int, default=128)
    args = parser.parse_args()

    start = time.perf_counter()
    model = load_model(args.model)
    print(f"load {args.model}: {time.perf_counter() - start:.1f} s")
    batches = list(iter_token_batches(model.tokenizer, iter_texts("builtin"), args.context_size, args.batch_size))[: args.batches]
    stop = stop_layer(model, [args.hook])
    kept_tokens = sum(int(b.mask_bt.sum()) for b in batches)
    all_tokens = sum(b.tokens_bt.numel() for b in batches)

    with torch.no_grad():
        model(batches[0].tokens_bt, stop_at_layer=stop)  # warm-up
        start = time.perf_counter()
        for batch in batches:
            model(batch.tokens_bt, stop_at_layer=stop)
        bare = all_tokens / (time.perf_counter() - start)

    source = ModelChunks(model, lambda: iter(batches), [args.hook])
    start = time.perf_counter()
    for batch in batches:
        capture(model, batch.tokens_bt, [args.hook], batch.mask_bt)
    ours = all_tokens / (time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as folder:
        manifest = StoreManifest(model=args.model, hooks=[args.hook], dataset="builtin", context_size=args.context_size,
                                 batch_size=args.batch_size, chunks_per_shard=2, target_tokens=kept_tokens)
        start = time.perf_counter()
        write_store(folder, source, manifest, progress=False)
        stored = all_tokens / (time.perf_counter() - start)

    print(f"hook {args.hook}, stop_at_layer={stop}, {len(batches)} batches of {args.batch_size}x{args.context_size} tokens")
    print(f"{'bare forward':<16} {bare:>10,.0f} tok/s")
    print(f"{'activations':<16} {ours:>10,.0f} tok/s")
    print(f"{'to disk store':<16} {stored:>10,.0f} tok/s")
    print(f"activations/bare={ours / bare:.2f} store/bare={stored / bare:.2f}")


if __name__ == "__main__":
    main()
