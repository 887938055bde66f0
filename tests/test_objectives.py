"""The maximum-likelihood objective and its metrics against NumPy log-softmax in float64."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nlm_jax import objectives
from nlm_jax.objectives import bits_per_token, perplexity

# Jitted: eager JAX compiles every primitive on first use, slower here than one program per shape.
next_token_nll = jax.jit(objectives.next_token_nll)
classification_nll = jax.jit(objectives.classification_nll)
accuracy = jax.jit(objectives.accuracy)


def log_softmax_numpy(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def nll_numpy(logits_BxTxV, targets_BxT, mask_BxT=None):
  """−Σ m_t log softmax(logits_t)[w_t] and Σ m_t, by hand."""
  logp = log_softmax_numpy(logits_BxTxV)
  mask = np.ones(targets_BxT.shape) if mask_BxT is None else np.asarray(mask_BxT, np.float64)
  picked = np.take_along_axis(logp, np.asarray(targets_BxT)[..., None], axis=-1)[..., 0]
  return -(picked * mask).sum(), mask.sum()


def random_batch(B=3, T=5, V=11, seed=0, scale=3.0):
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(scale * rng.standard_normal((B, T, V)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
  return logits, targets, rng


def test_next_token_nll_equals_numpy_log_softmax():
  logits, targets, _ = random_batch()
  nll_sum, count = next_token_nll(logits, targets)
  expected_sum, expected_count = nll_numpy(logits, targets)
  np.testing.assert_allclose(nll_sum, expected_sum, rtol=1e-6)
  assert float(count) == expected_count == targets.size


@pytest.mark.parametrize("mask_dtype", [jnp.bool_, jnp.int32, jnp.float32])
def test_masked_positions_count_for_nothing(mask_dtype):
  logits, targets, rng = random_batch()
  mask = rng.random(targets.shape) < 0.6
  nll_sum, count = next_token_nll(logits, targets, jnp.asarray(mask, mask_dtype))
  expected_sum, expected_count = nll_numpy(logits, targets, mask)
  np.testing.assert_allclose(nll_sum, expected_sum, rtol=1e-6)
  assert float(count) == expected_count == mask.sum()
  # whatever sits under the mask does not matter: other targets, other logits
  other_targets = jnp.where(jnp.asarray(mask), targets, (targets + 3) % logits.shape[-1])
  other_logits = jnp.where(jnp.asarray(mask)[..., None], logits, 50.0 * logits)
  np.testing.assert_allclose(next_token_nll(other_logits, other_targets, jnp.asarray(mask, mask_dtype))[0],
                             nll_sum, rtol=1e-6)
  assert abs(float(next_token_nll(other_logits, other_targets)[0]) - float(nll_sum)) > 1.0


def test_sums_and_counts_of_two_batches_compose_to_the_whole():
  """mean NLL = Σ sums / Σ counts exactly, whatever the batches' sizes and masks."""
  logits, targets, rng = random_batch(B=5, T=6)
  mask = jnp.asarray(rng.random(targets.shape) < 0.7)
  whole_sum, whole_count = next_token_nll(logits, targets, mask)
  s1, c1 = next_token_nll(logits[:2], targets[:2], mask[:2])
  s2, c2 = next_token_nll(logits[2:], targets[2:], mask[2:])
  np.testing.assert_allclose(s1 + s2, whole_sum, rtol=1e-6)
  assert float(c1 + c2) == float(whole_count)
  np.testing.assert_allclose((s1 + s2) / (c1 + c2), whole_sum / whole_count, rtol=1e-6)
  # the mean of the two batch means is not the mean: the counts differ
  assert float(c1) != float(c2)
  assert abs(float((s1 / c1 + s2 / c2) / 2) - float(whole_sum / whole_count)) > 1e-4


def test_perplexity_and_bits_per_token():
  logits, targets, _ = random_batch()
  nll_sum, count = next_token_nll(logits, targets)
  mean = float(nll_sum) / float(count)
  np.testing.assert_allclose(perplexity(nll_sum, count), math.exp(mean), rtol=1e-6)
  np.testing.assert_allclose(bits_per_token(nll_sum, count), mean / math.log(2), rtol=1e-6)
  # uniform predictions over V: NLL = ln V per token, perplexity V, log2 V bits
  V = 16
  uniform_sum, uniform_count = next_token_nll(jnp.zeros((2, 3, V)), jnp.zeros((2, 3), jnp.int32))
  np.testing.assert_allclose(uniform_sum / uniform_count, math.log(V), rtol=1e-6)
  np.testing.assert_allclose(perplexity(uniform_sum, uniform_count), V, rtol=1e-5)
  np.testing.assert_allclose(bits_per_token(uniform_sum, uniform_count), 4.0, rtol=1e-6)


def test_stable_for_large_logits():
  V = 7
  logits = jnp.zeros((1, 3, V)).at[0, :, 0].set(1e4).at[0, 2, 5].set(-1e4)
  targets = jnp.asarray([[0, 1, 5]], jnp.int32)
  per_token = [float(next_token_nll(logits[:, t:t + 1], targets[:, t:t + 1])[0]) for t in range(3)]
  np.testing.assert_allclose(per_token, [0.0, 1e4, 2e4], rtol=1e-6, atol=1e-6)
  grads = jax.grad(lambda l: next_token_nll(l, targets)[0])(logits)
  assert np.isfinite(grads).all()
  np.testing.assert_allclose(grads.sum(-1), 0.0, atol=1e-6)  # softmax − one-hot sums to 0
  # huge logits of equal size: still log V (to float32's resolution at 1e4), not nan or inf
  np.testing.assert_allclose(next_token_nll(jnp.full((1, 1, V), 1e4), jnp.zeros((1, 1), jnp.int32))[0],
                             math.log(V), atol=2e-3)


def test_bfloat16_logits_are_scored_in_float32():
  logits, targets, _ = random_batch(scale=20.0)
  logits_bf16 = logits.astype(jnp.bfloat16)
  nll_sum, count = next_token_nll(logits_bf16, targets)
  assert nll_sum.dtype == jnp.float32
  # exact for the bfloat16 values: no rounding beyond the logits' own
  np.testing.assert_allclose(nll_sum, nll_numpy(logits_bf16.astype(jnp.float32), targets)[0], rtol=1e-6)
  big = jnp.zeros((1, 2, 5), jnp.bfloat16).at[0, :, 0].set(1e4)
  np.testing.assert_allclose(next_token_nll(big, jnp.asarray([[0, 1]], jnp.int32))[0],
                             float(big[0, 0, 0]), rtol=1e-6)  # 0 + (1e4 rounded to bfloat16)


def test_classification_nll_and_accuracy():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)
  labels = jnp.asarray([0, 1, 2, 3, 1, 0], jnp.int32)
  logp = log_softmax_numpy(logits)
  nll_sum, count = classification_nll(logits, labels)
  np.testing.assert_allclose(nll_sum, -logp[np.arange(6), labels].sum(), rtol=1e-6)
  assert float(count) == 6
  mask = jnp.asarray([1, 0, 1, 1, 0, 1], bool)
  nll_sum, count = classification_nll(logits, labels, mask)
  np.testing.assert_allclose(nll_sum, -(logp[np.arange(6), labels] * np.asarray(mask)).sum(), rtol=1e-6)
  assert float(count) == 4

  predictions = np.argmax(np.asarray(logits), -1)
  correct, n = accuracy(logits, labels)
  assert float(correct) == (predictions == np.asarray(labels)).sum() and float(n) == 6
  hits = jnp.asarray(predictions, jnp.int32)  # labels equal to the argmax: all correct
  assert float(accuracy(logits, hits)[0]) == 6
  misses = (hits + 1) % 4
  assert float(accuracy(logits, misses)[0]) == 0
  mixed = jnp.where(mask, hits, misses)
  correct, n = accuracy(logits, mixed, mask)
  assert float(correct) == float(n) == 4  # the unmasked are the hits
  assert float(accuracy(logits, mixed, ~mask)[0]) == 0
