"""One sparsify (PyPI eai-sparsify) SparseCoder training step, as its Trainer takes it:
forward with a dead mask, FVU + AuxK loss, backward, gradient made orthogonal to the decoder
rows, Adam step, decoder rows renormalised. Prints tokens/s."""

import torch
from common import activations, parse_shape, tokens_per_second
from sparsify import SparseCoder, SparseCoderConfig

args = parse_shape()
torch.manual_seed(0)
sae = SparseCoder(args.d, SparseCoderConfig(num_latents=args.n, k=args.k))
optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
x = activations(args.tokens, args.d)
dead_mask = torch.zeros(args.n, dtype=torch.bool)


def step():
    out = sae(x, dead_mask=dead_mask)
    (out.fvu + out.auxk_loss / 32).backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    optimizer.step()
    optimizer.zero_grad()
    sae.set_decoder_norm_to_unit_norm()


print(tokens_per_second(step, args.tokens, args.steps))
