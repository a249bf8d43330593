"""One SAE Lens (PyPI sae-lens) TopKTrainingSAE training step: training_forward_pass with a
dead-neuron mask, backward, Adam step. Prints tokens/s."""

import torch
from common import activations, parse_shape, tokens_per_second
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput

args = parse_shape()
torch.manual_seed(0)
sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=args.d, d_sae=args.n, k=args.k))
optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
step_input = TrainStepInput(
    sae_in=activations(args.tokens, args.d),
    coefficients={},
    dead_neuron_mask=torch.zeros(args.n, dtype=torch.bool),
    n_training_steps=0,
    is_logging_step=False,
)


def step():
    sae.training_forward_pass(step_input).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


print(tokens_per_second(step, args.tokens, args.steps))
