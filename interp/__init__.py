"""interp: sparse autoencoders and transcoders for transformer activations."""

from interp.models import load_model
from interp.sae import create_coder, load_sae

__all__ = ["create_coder", "load_model", "load_sae"]
__version__ = "0.1.0"
