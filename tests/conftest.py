"""Tiny configs of each architecture, shared by the model tests (small enough to compile in ~1 s)."""

import os
import tempfile

import jax
import pytest

from nlm_jax.models import FNNConfig, LSTMConfig, RNNConfig, TransformerConfig

# One persistent compilation cache for the whole session (subprocesses too, by environment):
# many tests train the same tiny configs, and XLA compiles dominate their time on 2 CPU cores.
# A cached executable is the same program, so results stay bitwise identical.
_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="nlm-jax-xla-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

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
