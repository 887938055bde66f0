r"""Elman recurrent network language model (Elman 1990; Mikolov et al. 2010).

One layer, input x_t ∈ R^m, state h_t ∈ R^H:

    h_t = φ(W x_t + U h_{t−1} + b),     φ = tanh (or relu),   h_0 = 0
    W ∈ R^{H×m}, U ∈ R^{H×H}, b ∈ R^H

L layers are stacked (layer ℓ's input is layer ℓ−1's h_t) and the top h_t goes to the softmax
output layer (see `recurrent.py`). W x_t + b is computed for all t in one matrix product; only
U h_{t−1} runs inside `jax.lax.scan` over time.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from nlm_jax.models import layers
from nlm_jax.models.layers import param_init
from nlm_jax.models.recurrent import RecurrentLM, check_recurrent

Array = jax.Array
ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu}


@dataclasses.dataclass(frozen=True)
class RNNConfig:
  """Elman RNN LM: m = d_embed, H = d_hidden, L = n_layers."""

  arch: ClassVar[str] = "rnn"
  vocab_size: int
  d_embed: int = 200
  d_hidden: int = 200
  n_layers: int = 2
  activation: str = "tanh"
  dropout: float = 0.0
  tie_embeddings: bool = False
  embed_method: str = "auto"  # 'auto' | 'gather' | 'one_hot' (layers.embed_method)
  matmul_precision: Optional[str] = None  # float32 matmuls: None (backend default) | 'highest' | ...
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    check_recurrent(self)
    layers.require(self.activation in ACTIVATIONS, "activation", self.activation,
                   f"allowed: {', '.join(ACTIVATIONS)}")

  @property
  def hidden_size(self) -> int:
    return self.d_hidden


class ElmanLayer(nn.Module):
  """h_t = φ(W x_t + U h_{t−1} + b) over a (B, T, m) sequence; state h (B, H)."""

  cfg: RNNConfig

  @nn.compact
  def __call__(self, x_BxTxM: Array, h_BxH: Array):
    cfg = self.cfg
    H, pdt = cfg.d_hidden, jnp.dtype(cfg.param_dtype)
    init = layers.uniform(1.0 / math.sqrt(H))  # PyTorch's nn.RNN default
    W = self.param("W", param_init(init, ("embed", "hidden")), (x_BxTxM.shape[-1], H), pdt)
    U = self.param("U", param_init(init, ("hidden_in", "hidden")), (H, H), pdt)
    b = self.param("b", param_init(nn.initializers.zeros, ("hidden",)), (H,), pdt)
    dtype, phi = jnp.dtype(cfg.dtype), ACTIVATIONS[cfg.activation]
    Wx_TxBxH = (x_BxTxM.astype(dtype) @ W.astype(dtype) + b.astype(dtype)).swapaxes(0, 1)
    U = U.astype(dtype)

    def step(h_BxH, Wx_BxH):
      h_BxH = phi(Wx_BxH + h_BxH @ U)
      return h_BxH, h_BxH

    h_BxH, h_TxBxH = jax.lax.scan(step, h_BxH.astype(dtype), Wx_TxBxH)
    return h_TxBxH.swapaxes(0, 1), h_BxH


def zero_state(cfg: RNNConfig, batch_size: int) -> Array:
  return jnp.zeros((batch_size, cfg.d_hidden), jnp.dtype(cfg.dtype))


def RNN(cfg: RNNConfig, name: str | None = None) -> RecurrentLM:
  """Elman RNN LM: tokens (B, T) → `LMOutput`; carry = tuple of L states h (B, H)."""
  return RecurrentLM(cfg, ElmanLayer, zero_state, name=name)
