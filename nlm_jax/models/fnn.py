r"""Feedforward neural probabilistic language model (Bengio, Ducharme, Vincent & Jauvin 2003).

An n-gram model with learned word features. For the next word after w_{t−n+2}..w_t:

    x = (C[w_{t−n+2}], ..., C[w_t]) ∈ R^{(n−1)m}     concatenated rows of C ∈ R^{|V|×m}
    y = b + W x + U tanh(d + H x)                      logits over V
    P(w_{t+1} | w_{t−n+2..t}) = softmax(y)

    H ∈ R^{h×(n−1)m}, d ∈ R^h, U ∈ R^{|V|×h}, b ∈ R^{|V|}, W ∈ R^{|V|×(n−1)m} (the optional
    direct embedding→output connections; W = 0 when `direct=False`).

Parameters: |V|(1+nm+h) + h(1+(n−1)m) with direct connections, |V|(1+h) + h(1+(n−1)m) + |V|m
without, as in the paper. Positions with fewer than n−1 predecessors see `bos_id`. The carry is
the last n−1 token ids (B, n−1), so a call continues a sliding window where the last one stopped.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from nlm_jax.models import layers
from nlm_jax.models.layers import LMOutput, constrain, param_init

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class FNNConfig:
  """Bengio NPLM: n = context (the n of the n-gram), m = d_embed, h = d_hidden."""

  arch: ClassVar[str] = "fnn"
  vocab_size: int
  context: int = 5  # n: predicts word n from the n−1 before it
  d_embed: int = 60  # m
  d_hidden: int = 100  # h
  direct: bool = True  # the direct connections W
  bos_id: int = 0  # id seen at positions with fewer than n−1 predecessors
  dropout: float = 0.0  # on the tanh layer
  embed_method: str = "auto"  # 'auto' | 'gather' | 'one_hot' (layers.embed_method)
  matmul_precision: Optional[str] = None  # float32 matmuls: None (backend default) | 'highest' | ...
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    layers.check_common(self)
    layers.require(isinstance(self.context, int) and self.context >= 2, "context", self.context,
                   "the n of the n-gram must be an integer ≥ 2")
    layers.positive(self, "d_embed", "d_hidden")
    layers.require(0 <= self.bos_id < self.vocab_size, "bos_id", self.bos_id,
                   f"must be a token id in [0, {self.vocab_size})")

  @property
  def hidden_size(self) -> int:
    return self.d_hidden

  def num_params(self) -> int:
    """The paper's count: |V|(1+nm+h) + h(1+(n−1)m), or without W: |V|(1+h) + h(1+(n−1)m) + |V|m."""
    V, n, m, h = self.vocab_size, self.context, self.d_embed, self.d_hidden
    if self.direct:
      return V * (1 + n * m + h) + h * (1 + (n - 1) * m)
    return V * (1 + h) + h * (1 + (n - 1) * m) + V * m


class FNN(nn.Module):
  """Bengio NPLM: tokens (B, T) → `LMOutput`; carry = the last n−1 token ids (B, n−1)."""

  cfg: FNNConfig

  def initial_carry(self, batch_size: int) -> Array:
    return jnp.full((batch_size, self.cfg.context - 1), self.cfg.bos_id, jnp.int32)

  def __call__(self, tokens_BxT: Array, carry: Optional[Array] = None, *,
               deterministic: bool = True, logits: bool = True) -> LMOutput:
    """`logits=False`: no output layers U, W (not created by `init` either); `LMOutput.logits` is None."""
    with layers.matmul_precision(self.cfg.matmul_precision):
      return self._forward(tokens_BxT, carry, deterministic, logits)

  @nn.compact
  def _forward(self, tokens_BxT: Array, carry: Optional[Array], deterministic: bool, logits: bool) -> LMOutput:
    cfg = self.cfg
    B, T = tokens_BxT.shape
    n, V, dtype, pdt = cfg.context, cfg.vocab_size, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    if carry is None:
      carry = self.initial_carry(B)
    # w_{−n+2}..w_{T}: the n−1 ids before this call, then this call's ids.
    w_BxS = jnp.concatenate([carry.astype(tokens_BxT.dtype), tokens_BxT], axis=1)
    C = layers.Embed(V, cfg.d_embed, nn.initializers.normal(1.0), method=cfg.embed_method, dtype=dtype,
                     param_dtype=pdt, name="C")
    e_BxSxM = C(w_BxS)
    # x_t = (C[w_{t−n+2}], ..., C[w_t]): the n−1 embeddings ending at position t, which is
    # index t + n−1 of w_BxS (the carry fills indices 0..n−2).
    x_BxTxNM = jnp.concatenate([e_BxSxM[:, j + 1:j + 1 + T] for j in range(n - 1)], axis=-1)
    x_BxTxNM = constrain(x_BxTxNM, ("batch", "length", "window"))
    hidden_BxTxH = jnp.tanh(nn.Dense(cfg.d_hidden, dtype=dtype, param_dtype=pdt,  # d + H x
                                     kernel_init=param_init(nn.initializers.glorot_uniform(), ("window", "hidden")),
                                     bias_init=param_init(nn.initializers.zeros, ("hidden",)),
                                     name="H")(x_BxTxNM))
    if not logits:
      return LMOutput(None, w_BxS[:, -(n - 1):], hidden_BxTxH)
    a_BxTxH = nn.Dropout(cfg.dropout)(hidden_BxTxH, deterministic=deterministic)
    y_BxTxV = nn.Dense(V, dtype=dtype, param_dtype=pdt,  # b + U tanh(d + H x)
                       kernel_init=param_init(nn.initializers.glorot_uniform(), ("hidden", "vocab")),
                       bias_init=param_init(nn.initializers.zeros, ("vocab",)), name="U")(a_BxTxH)
    if cfg.direct:  # + W x
      y_BxTxV = y_BxTxV + nn.Dense(V, use_bias=False, dtype=dtype, param_dtype=pdt,
                                   kernel_init=param_init(nn.initializers.zeros, ("window", "vocab")),
                                   name="W")(x_BxTxNM)
    y_BxTxV = constrain(y_BxTxV, ("batch", "length", "vocab"))
    return LMOutput(y_BxTxV, w_BxS[:, -(n - 1):], hidden_BxTxH)
