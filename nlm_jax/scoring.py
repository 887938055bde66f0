"""Per-token log-probabilities of a token stream under a trained model: what mixtures of models
(Bengio et al. 2003 interpolate their MLP with a Kneser–Ney model), calibration and error analyses
need, where `Run.evaluate` gives only sums.

    log_p = token_log_probs(model, params, tokens_N)   # (N−1,): ln P(w_{t+1} | w_{≤t}), t = 0..N−2
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnums=0)
def _chunk_log_probs(model, params, carry, inputs_1xT, targets_1xT):
  out = model.apply({"params": params}, inputs_1xT, carry)
  log_p_1xTxV = jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)
  return out.carry, jnp.take_along_axis(log_p_1xTxV, targets_1xT[..., None], axis=-1)[0, :, 0]


def token_log_probs(model, params, tokens_N: np.ndarray, chunk: int = 512) -> np.ndarray:
  """ln P(w_{t+1} | w_0..w_t) for t = 0..N−2, reading the stream in chunks of `chunk` tokens
  with the carry passed on (recurrent state, the FNN's window): every token sees its whole left
  context as in one call. The Transformer's context is its window: use chunk ≤ model.cfg.context
  (each chunk then starts from an empty context)."""
  tokens_N = np.asarray(tokens_N, np.int32)
  if tokens_N.ndim != 1 or len(tokens_N) < 2:
    raise ValueError(f"need a 1-D stream of at least 2 tokens, got shape {tokens_N.shape}")
  is_transformer = getattr(model.cfg, "arch", None) == "transformer"
  if is_transformer and chunk > model.cfg.context:
    raise ValueError(f"chunk={chunk} exceeds the Transformer's context {model.cfg.context}")
  carry = None if is_transformer else model.initial_carry(1)
  inputs, targets = tokens_N[:-1], tokens_N[1:]
  pieces = []
  n = len(inputs)
  for start in range(0, n, chunk):
    x, y = inputs[start:start + chunk], targets[start:start + chunk]
    pad = chunk - len(x)  # one compiled shape: pad the last chunk, drop its padded scores
    x_1xT = jnp.asarray(np.pad(x, (0, pad))[None])
    y_1xT = jnp.asarray(np.pad(y, (0, pad))[None])
    carry, lp = _chunk_log_probs(model, params, carry, x_1xT, y_1xT)
    pieces.append(np.asarray(lp)[:len(x)])
  return np.concatenate(pieces)
