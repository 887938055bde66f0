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
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 50)
  lp = token_log_probs(model, params, tokens, chunk=7)  # 49 scores: 7 chunks, the last one padded
  full = model.apply({"params": params}, jnp.asarray(tokens[None, :-1])).logits[0]
  expected = jax.nn.log_softmax(full, axis=-1)[np.arange(49), tokens[1:]]
  np.testing.assert_allclose(lp, expected, rtol=1e-5, atol=1e-5)
  nll, count = next_token_nll(full[None], jnp.asarray(tokens[None, 1:]))
  assert count == 49 and -lp.sum() == pytest.approx(float(nll), rel=1e-5)


def test_transformer_chunks_must_fit_its_context(transformer_config):
  model = build(transformer_config)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  with pytest.raises(ValueError, match="context"):
    token_log_probs(model, params, np.arange(30) % 13, chunk=transformer_config.context + 1)
  lp = token_log_probs(model, params, np.arange(30) % 13, chunk=transformer_config.context)
  assert lp.shape == (29,) and np.all(lp < 0)
