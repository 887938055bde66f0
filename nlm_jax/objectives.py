"""Maximum-likelihood objective and the metrics derived from it.

Losses return a *sum* and a *count* rather than a mean, so that means over batches, hosts and
devices are exact: mean NLL = Σ sums / Σ counts.

    NLL = −Σ_t m_t log softmax(logits_t)[w_{t+1}],   count = Σ_t m_t     (m: 0/1 mask)
    perplexity = exp(NLL / count),   bits per token = NLL / (count · ln 2)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def next_token_nll(logits_BxTxV: Array, targets_BxT: Array, mask_BxT: Array | None = None,
                   label_smoothing: float = 0.0) -> tuple[Array, Array]:
  """Summed negative log-likelihood (nats) of `targets` under `logits`, and the token count.

  The log-softmax runs in float32 or wider whatever the compute dtype of the logits (float64
  logits stay float64). With `label_smoothing` ε > 0 the target is (1 − ε)·one-hot + ε/V
  (`optax.smooth_labels`): the cross-entropy against it, no longer a likelihood.
  """
  dtype = jnp.promote_types(logits_BxTxV.dtype, jnp.float32)
  logits_BxTxV = logits_BxTxV.astype(dtype)
  if label_smoothing:
    targets_BxTxV = optax.smooth_labels(jax.nn.one_hot(targets_BxT, logits_BxTxV.shape[-1], dtype=dtype),
                                        label_smoothing)
    nll_BxT = optax.softmax_cross_entropy(logits_BxTxV, targets_BxTxV)
  else:
    nll_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)
  if mask_BxT is None:
    return nll_BxT.sum(), jnp.asarray(nll_BxT.size, jnp.float32)
  mask_BxT = mask_BxT.astype(jnp.float32)
  return (nll_BxT * mask_BxT).sum(), mask_BxT.sum()


def classification_nll(logits_BxC: Array, labels_B: Array, mask_B: Array | None = None,
                       label_smoothing: float = 0.0) -> tuple[Array, Array]:
  """Summed cross-entropy (nats) of class `labels` under `logits`, and the example count (the
  mask's sum: weights 0 drop padding rows); `label_smoothing` as in `next_token_nll`."""
  return next_token_nll(logits_BxC[:, None], labels_B[:, None],
                        None if mask_B is None else mask_B[:, None], label_smoothing)


def distillation_kl(logits_BxC: Array, soft_BxC: Array, temperature: float = 1.0,
                    mask_B: Array | None = None) -> tuple[Array, Array]:
  """Summed T² · KL(q_b ‖ softmax(logits_b / T)) over the examples, and their count: knowledge
  distillation's soft-target loss (Hinton et al. 2015), with `soft` the teachers' class
  distributions q at the same temperature T (T² keeps its gradients' scale as T changes)."""
  dtype = jnp.promote_types(logits_BxC.dtype, jnp.float32)
  log_p_BxC = jax.nn.log_softmax(logits_BxC.astype(dtype) / temperature, axis=-1)
  kl_B = optax.losses.kl_divergence(log_p_BxC, soft_BxC.astype(dtype)) * temperature**2
  if mask_B is None:
    return kl_B.sum(), jnp.asarray(kl_B.size, jnp.float32)
  mask_B = mask_B.astype(jnp.float32)
  return (kl_B * mask_B).sum(), mask_B.sum()


def perplexity(nll_sum, count):
  """exp(mean NLL)."""
  return jnp.exp(nll_sum / count)


def bits_per_token(nll_sum, count):
  """Mean NLL in bits: NLL / (count · ln 2). For a char or byte tokenizer this is bits per char/byte."""
  return nll_sum / (count * math.log(2.0))


def accuracy(logits_BxC: Array, labels_B: Array, mask_B: Array | None = None) -> tuple[Array, Array]:
  """Number of correct argmax predictions, and the example count."""
  correct_B = (jnp.argmax(logits_BxC, axis=-1) == labels_B).astype(jnp.float32)
  if mask_B is None:
    return correct_B.sum(), jnp.asarray(correct_B.size, jnp.float32)
  mask_B = mask_B.astype(jnp.float32)
  return (correct_B * mask_B).sum(), mask_B.sum()
