"""Train one sparsify (PyPI eai-sparsify) TopK SparseCoder on activations from a file, as
sparsify's Trainer trains one on a hookpoint's outputs, and save it with sparsify's own
save_to_disk. Runs inside sparsify's environment (bench/peers/environment.py).

    python sparsify_train.py --acts ACTS.safetensors --out DIR --latents N --k K --batch B --recipe adam

ACTS holds "x" (tokens, d), already in the order to train on; batch j is rows [j*B, (j+1)*B).
The step is the Trainer's (sparsify/trainer.py, 1.3.3) for loss_fn "fvu": on the first batch
b_dec is set to the batch mean; every step the decoder rows are made unit norm, the forward takes
the dead mask (latents that have not fired for --dead-tokens tokens, when AuxK is on), the loss
is fvu + auxk_alpha * auxk_loss, the gradient parallel to the decoder rows is removed, the
optimiser steps, and the tokens-since-fired counters are updated.

Recipes:
- adam: torch Adam at sparsify's default learning rate 2e-4 / sqrt(n / 2^14), held constant
  (sparsify's own scheduler warms up over 1,000 steps, longer than the runs compared here),
  AuxK on with auxk_alpha 1/32.
- signum: sparsify 1.3.3's default optimiser, schedule-free sign descent (ScheduleFreeWrapper
  around SignSGD, momentum 0.95) at its default 5e-3 / sqrt(n / 2^14), and its default
  auxk_alpha 0 (AuxK off); the wrapper's averaged weights are the ones saved, as the Trainer's
  save does.
"""

import argparse

import torch
from safetensors.torch import load_file
from sparsify import SparseCoder, SparseCoderConfig

parser = argparse.ArgumentParser()
parser.add_argument("--acts", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--latents", type=int, required=True)
parser.add_argument("--k", type=int, required=True)
parser.add_argument("--batch", type=int, required=True)
parser.add_argument("--recipe", choices=("adam", "signum"), required=True)
parser.add_argument("--dead-tokens", type=int, default=200_000)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

x = load_file(args.acts)["x"]
torch.manual_seed(args.seed)
sae = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=args.latents, k=args.k))
if args.recipe == "adam":
    optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4 / (args.latents / 2**14) ** 0.5)
    auxk_alpha = 1 / 32
else:
    from schedulefree import ScheduleFreeWrapper
    from sparsify.sign_sgd import SignSGD

    optimizer = ScheduleFreeWrapper(SignSGD(sae.parameters(), lr=5e-3 / (args.latents / 2**14) ** 0.5), momentum=0.95)
    optimizer.train()
    auxk_alpha = 0.0
tokens_since_fired = torch.zeros(args.latents, dtype=torch.long)
steps = len(x) // args.batch
for step in range(steps):
    batch = x[step * args.batch:(step + 1) * args.batch]
    if step == 0:
        sae.b_dec.data = batch.mean(0)
    sae.set_decoder_norm_to_unit_norm()
    dead_mask = tokens_since_fired > args.dead_tokens if auxk_alpha > 0 else None
    out = sae(batch, dead_mask=dead_mask)
    (out.fvu + auxk_alpha * out.auxk_loss).backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        tokens_since_fired += len(batch)
        tokens_since_fired[out.latent_indices.flatten()] = 0
    if step % 50 == 0 or step == steps - 1:
        print(f"sparsify {args.recipe} step {step + 1}/{steps}: fvu {out.fvu.item():.4f}", flush=True)
if args.recipe == "signum":
    optimizer.eval()
sae.save_to_disk(args.out)
