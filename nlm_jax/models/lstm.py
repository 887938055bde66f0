r"""Long short-term memory language model (Hochreiter & Schmidhuber 1997; Zaremba et al. 2014).

One layer, input x_t ∈ R^m, hidden state h_t ∈ R^H, cell c_t ∈ R^H:

    i_t = σ(W_i x_t + U_i h_{t−1} + b_i)          input gate
    f_t = σ(W_f x_t + U_f h_{t−1} + b_f)          forget gate   (b_f initialised to 1)
    g_t = tanh(W_g x_t + U_g h_{t−1} + b_g)       cell candidate
    o_t = σ(W_o x_t + U_o h_{t−1} + b_o)          output gate
    c_t = f_t ⊙ c_{t−1} + i_t ⊙ g_t
    h_t = o_t ⊙ tanh(c_t),                       h_0 = c_0 = 0

The four W_· are one (m, 4, H) tensor and the four U_· one (H, 4, H) tensor, gate order
(i, f, g, o); the gate units H carry the 'hidden' axis that tensor parallelism shards. W x_t + b
is computed for all t in one matrix product; only U h_{t−1} runs inside `jax.lax.scan`.
Layers stack as in `recurrent.py`, with dropout on non-recurrent connections only.
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
I, F, G, O = range(4)  # gate order in the stacked weights


@dataclasses.dataclass(frozen=True)
class LSTMConfig:
  """LSTM LM: m = d_embed, H = d_hidden, L = n_layers."""

  arch: ClassVar[str] = "lstm"
  vocab_size: int
  d_embed: int = 200
  d_hidden: int = 200
  n_layers: int = 2
  forget_bias: float = 1.0
  dropout: float = 0.0
  tie_embeddings: bool = False
  embed_method: str = "auto"  # 'auto' | 'gather' | 'one_hot' (layers.embed_method)
  matmul_precision: Optional[str] = None  # float32 matmuls: None (backend default) | 'highest' | ...
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    check_recurrent(self)

  @property
  def hidden_size(self) -> int:
    return self.d_hidden


class LSTMLayer(nn.Module):
  """The gate equations above over a (B, T, m) sequence; state (c, h), each (B, H)."""

  cfg: LSTMConfig

  @nn.compact
  def __call__(self, x_BxTxM: Array, state):
    cfg = self.cfg
    H, pdt = cfg.d_hidden, jnp.dtype(cfg.param_dtype)
    init = layers.uniform(1.0 / math.sqrt(H))  # PyTorch's nn.LSTM default

    def bias_init(key, shape, dtype=jnp.float32):
      return jnp.zeros(shape, dtype).at[F].set(cfg.forget_bias)

    W = self.param("W", param_init(init, ("embed", "gates", "hidden")), (x_BxTxM.shape[-1], 4, H), pdt)
    U = self.param("U", param_init(init, ("hidden_in", "gates", "hidden")), (H, 4, H), pdt)
    b = self.param("b", param_init(bias_init, ("gates", "hidden")), (4, H), pdt)
    dtype = jnp.dtype(cfg.dtype)
    Wx_TxBx4xH = (jnp.einsum("btm,mgh->btgh", x_BxTxM.astype(dtype), W.astype(dtype))
                  + b.astype(dtype)).swapaxes(0, 1)
    U = U.astype(dtype)

    def step(carry, Wx_Bx4xH):
      c_BxH, h_BxH = carry
      z_Bx4xH = Wx_Bx4xH + jnp.einsum("bh,hgk->bgk", h_BxH, U)
      i_t = jax.nn.sigmoid(z_Bx4xH[:, I])
      f_t = jax.nn.sigmoid(z_Bx4xH[:, F])
      g_t = jnp.tanh(z_Bx4xH[:, G])
      o_t = jax.nn.sigmoid(z_Bx4xH[:, O])
      c_BxH = f_t * c_BxH + i_t * g_t
      h_BxH = o_t * jnp.tanh(c_BxH)
      return (c_BxH, h_BxH), h_BxH

    c0, h0 = state
    (c_BxH, h_BxH), h_TxBxH = jax.lax.scan(step, (c0.astype(dtype), h0.astype(dtype)), Wx_TxBx4xH)
    return h_TxBxH.swapaxes(0, 1), (c_BxH, h_BxH)


def zero_state(cfg: LSTMConfig, batch_size: int):
  zeros = jnp.zeros((batch_size, cfg.d_hidden), jnp.dtype(cfg.dtype))
  return (zeros, zeros)


def LSTM(cfg: LSTMConfig, name: str | None = None) -> RecurrentLM:
  """LSTM LM: tokens (B, T) → `LMOutput`; carry = tuple of L states (c, h), each (B, H)."""
  return RecurrentLM(cfg, LSTMLayer, zero_state, name=name)
