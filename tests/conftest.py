"""Tiny configs of each architecture, shared by the model tests (small enough to compile in ~1 s)."""

import pytest

from nlm_jax.models import FNNConfig, LSTMConfig, RNNConfig, TransformerConfig

VOCAB = 13
ARCHS = ("fnn", "rnn", "lstm", "transformer")


@pytest.fixture
def fnn_config() -> FNNConfig:
  return FNNConfig(vocab_size=VOCAB, context=4, d_embed=8, d_hidden=16)


@pytest.fixture
def rnn_config() -> RNNConfig:
  return RNNConfig(vocab_size=VOCAB, d_embed=8, d_hidden=12, n_layers=2)


@pytest.fixture
def lstm_config() -> LSTMConfig:
  return LSTMConfig(vocab_size=VOCAB, d_embed=8, d_hidden=12, n_layers=2)


@pytest.fixture
def transformer_config() -> TransformerConfig:
  return TransformerConfig(vocab_size=VOCAB, d_model=16, n_heads=2, n_layers=2, d_ff=32, context=12)


@pytest.fixture(params=ARCHS)
def config(request):
  """Each architecture's tiny config in turn."""
  return request.getfixturevalue(f"{request.param}_config")
