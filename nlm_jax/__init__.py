"""nlm-jax: neural language models in JAX/Flax."""

from nlm_jax import models, objectives
from nlm_jax.models import build
from nlm_jax.objectives import bits_per_token, next_token_nll, perplexity

__version__ = "0.1.0"
__all__ = ["models", "objectives", "build", "next_token_nll", "perplexity", "bits_per_token"]
