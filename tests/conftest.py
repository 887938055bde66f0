"""Device settings for the whole suite, and tiny configs of each architecture shared by the model
tests (small enough to compile in ~1 s)."""

import os
import shutil
import tempfile

# Before JAX starts a backend, the same settings on any machine (nlm_jax.runtime says why): no GPU
# memory preallocation (every xdist worker starts its own backend), deterministic GPU ops, and
# exact float32 matmuls, so the math tests assert the math rather than TF32's rounding. Set in the
# environment too, for the subprocesses tests start.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# The suite compiles hundreds of tiny programs: on a CPU, compiling (not running) them is most of
# its time. LLVM without its optimization passes compiles a tiny training run's programs in about
# half the time (17.5 s → 10.9 s for a cold 10-step Transformer run, same loss to the last digit)
# and runs tiny models as fast. CPU only (GPU code generation ignores these flags); a machine that
# sets --xla_backend_optimization_level itself keeps its own.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *FAST_COMPILE_FLAGS]).strip()
from nlm_jax import runtime  # noqa: E402

runtime.configure(deterministic=True, matmul_precision=os.environ["JAX_DEFAULT_MATMUL_PRECISION"])

import jax  # noqa: E402
import pytest  # noqa: E402

from nlm_jax.models import FNNConfig, LSTMConfig, RNNConfig, TransformerConfig  # noqa: E402

# One persistent compilation cache for the whole session (subprocesses too, by environment):
# many tests train the same tiny configs, and XLA compiles dominate their time on 2 CPU cores.
# A cached executable is the same program, so results stay bitwise identical. The directory this
# session made is removed when it ends (by the xdist controller, after its workers).
_MADE_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="nlm-jax-xla-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)



def pytest_sessionfinish(session, exitstatus):
  if _MADE_CACHE and not hasattr(session.config, "workerinput"):
    shutil.rmtree(_CACHE, ignore_errors=True)


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
