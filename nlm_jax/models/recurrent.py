"""The part the Elman RNN and the LSTM language models share: embed, stack L recurrent layers,
project to the vocabulary. The recurrences themselves live in `rnn.py` and `lstm.py`.

    x_t = E[w_t]                      E ∈ R^{|V|×m}
    h^ℓ_t = layer_ℓ(h^{ℓ−1}_t, state^ℓ_{t−1}),   h^0_t = x_t,   ℓ = 1..L
    logits_t = h^L_t W_out + b_out    (tied: W_out = Eᵀ, needs m = H)

Dropout (Zaremba et al. 2014) acts on the non-recurrent connections only: on x_t, between
layers and before the output layer, never on the state carried from t−1 to t.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nlm_jax.models import layers
from nlm_jax.models.layers import LMOutput, constrain, param_init

Array = jax.Array


def check_recurrent(cfg: Any) -> None:
  layers.check_common(cfg)
  layers.positive(cfg, "d_embed", "d_hidden", "n_layers")
  layers.require(not cfg.tie_embeddings or cfg.d_embed == cfg.d_hidden, "tie_embeddings",
                 cfg.tie_embeddings, f"tying needs d_embed == d_hidden (got {cfg.d_embed} and {cfg.d_hidden})")


class RecurrentLM(nn.Module):
  """Embedding → L recurrent layers → output layer. `layer` is the recurrence module class,
  called as `layer(cfg)(x_BxTxE, state) -> (h_BxTxH, new_state)`; `zero_state(cfg, B)` gives
  one layer's initial state."""

  cfg: Any
  layer: Any
  zero_state: Any

  def initial_carry(self, batch_size: int) -> tuple:
    """The zero state of every layer: a tuple of L per-layer states."""
    return tuple(self.zero_state(self.cfg, batch_size) for _ in range(self.cfg.n_layers))

  def __call__(self, tokens_BxT: Array, carry: tuple | None = None, *,
               deterministic: bool = True, logits: bool = True) -> LMOutput:
    """`logits=False`: no output layer (not created by `init` either); `LMOutput.logits` is None."""
    with layers.matmul_precision(self.cfg.matmul_precision):
      return self._forward(tokens_BxT, carry, deterministic, logits)

  @nn.compact
  def _forward(self, tokens_BxT: Array, carry: tuple | None, deterministic: bool, logits: bool) -> LMOutput:
    cfg = self.cfg
    if carry is None:
      carry = self.initial_carry(tokens_BxT.shape[0])
    dtype = jnp.dtype(cfg.dtype)
    embed = layers.Embed(cfg.vocab_size, cfg.d_embed, layers.uniform(0.1), method=cfg.embed_method,
                         dtype=dtype, param_dtype=jnp.dtype(cfg.param_dtype), name="embed")
    drop = nn.Dropout(cfg.dropout)
    h_BxTxH = drop(embed(tokens_BxT), deterministic=deterministic)
    h_BxTxH = constrain(h_BxTxH, ("batch", "length", "embed_act"))
    new_carry = []
    for l, state in enumerate(carry):
      h_BxTxH, state = self.layer(cfg, name=f"layer_{l}")(h_BxTxH, state)
      new_carry.append(state)
      if l < cfg.n_layers - 1:
        h_BxTxH = drop(h_BxTxH, deterministic=deterministic)
    hidden_BxTxH = h_BxTxH
    if not logits:
      return LMOutput(None, tuple(new_carry), hidden_BxTxH)
    h_BxTxH = drop(h_BxTxH, deterministic=deterministic)
    if cfg.tie_embeddings:
      b_out = self.param("out_bias", param_init(nn.initializers.zeros, ("vocab",)), (cfg.vocab_size,),
                         jnp.dtype(cfg.param_dtype))
      logits_BxTxV = embed.attend(h_BxTxH) + b_out.astype(dtype)
    else:
      logits_BxTxV = layers.Affine(cfg.vocab_size, ("hidden", "vocab"), layers.uniform(0.1), dtype=dtype,
                                   param_dtype=jnp.dtype(cfg.param_dtype), name="out")(h_BxTxH)
    logits_BxTxV = constrain(logits_BxTxV, ("batch", "length", "vocab"))
    return LMOutput(logits_BxTxV, tuple(new_carry), hidden_BxTxH)
