"""Per-token log-probabilities of a stream: their sum is the summed NLL of one call."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nlm_jax import build, next_token_nll
from nlm_jax.scoring import token_log_probs


@pytest.mark.parametrize("arch", ["fnn", "lstm"])
def test_chunked_scores_equal_one_call_over_the_stream(request, arch):
  cfg = request.getfixturevalue(f"{arch}_config")
  model = build(cfg)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 51)
  lp = token_log_probs(model, params, tokens, chunk=7)  # 50 scores: 8 chunks, the last one (1 target) padded
  full = model.apply({"params": params}, jnp.asarray(tokens[None, :-1])).logits[0]
  expected = jax.nn.log_softmax(full, axis=-1)[np.arange(50), tokens[1:]]
  np.testing.assert_allclose(lp, expected, rtol=1e-5, atol=1e-5)
  nll, count = next_token_nll(full[None], jnp.asarray(tokens[None, 1:]))
  assert count == 50 and -lp.sum() == pytest.approx(float(nll), rel=1e-5)


def test_transformer_chunks_must_fit_its_context(transformer_config):
  model = build(transformer_config)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  with pytest.raises(ValueError, match="context"):
    token_log_probs(model, params, np.arange(30) % 13, chunk=transformer_config.context + 1)
  lp = token_log_probs(model, params, np.arange(30) % 13, chunk=transformer_config.context)
  assert lp.shape == (29,) and np.all(lp < 0)


@pytest.mark.parametrize("n_tokens", [51, 46])
def test_transformer_chunks_score_as_separate_calls(transformer_config, n_tokens):
  """With chunk ≤ context each chunk is its own context: its scores are those of one call on that
  chunk alone, the last, shorter chunk too (padded after its tokens, which a causal model ignores)."""
  model = build(transformer_config)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  tokens = np.random.default_rng(1).integers(0, transformer_config.vocab_size, n_tokens)
  chunk = 7
  lp = token_log_probs(model, params, tokens, chunk=chunk)
  expected = []
  for start in range(0, n_tokens - 1, chunk):
    x, y = tokens[start:start + chunk], tokens[start + 1:start + chunk + 1]
    x = x[:len(y)]
    logits = model.apply({"params": params}, jnp.asarray(x[None])).logits[0]
    expected.append(np.asarray(jax.nn.log_softmax(logits, axis=-1))[np.arange(len(y)), y])
  assert (n_tokens - 1) % chunk and lp.shape == (n_tokens - 1,)
  np.testing.assert_allclose(lp, np.concatenate(expected), rtol=1e-5, atol=1e-5)
