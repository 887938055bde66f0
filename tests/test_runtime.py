"""nlm_jax.runtime: the device settings the CLI, library users and this suite apply before JAX starts."""

import json
import os
import subprocess
import sys

import pytest

from nlm_jax import runtime

PROBE = """
import json, os, sys
from nlm_jax import runtime
runtime.configure(**json.loads(sys.argv[1]))
import jax, jax.numpy as jnp
jnp.ones(3).block_until_ready()
print(json.dumps({"xla_flags": os.environ.get("XLA_FLAGS", ""),
                  "prealloc": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"), **runtime.describe()}))
"""


def probe(env_extra: dict, **settings) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_DEFAULT_MATMUL_PRECISION")}
  env.update(env_extra)
  out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(settings)], env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_configure_sets_flags_before_the_backend_starts_and_keeps_other_flags():
  # The host platform, also on a GPU machine (where jax.devices() would list the GPU).
  state = probe({"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}, deterministic=True,
                matmul_precision="highest", preallocate=False)
  assert state["xla_flags"].split() == ["--xla_force_host_platform_device_count=2", runtime.DETERMINISTIC_FLAG]
  assert state["devices"] == 2  # the user's own flag still acted
  assert state["deterministic_ops"] is True and state["matmul_precision"] == "highest"
  assert state["prealloc"] == "false"


def test_deterministic_false_removes_the_flag_and_none_leaves_everything_alone():
  off = probe({"XLA_FLAGS": runtime.DETERMINISTIC_FLAG}, deterministic=False)
  assert off["xla_flags"] == "" and off["deterministic_ops"] is False
  untouched = probe({"XLA_FLAGS": runtime.DETERMINISTIC_FLAG})
  assert untouched["deterministic_ops"] is True and untouched["matmul_precision"] is None


def test_deterministic_after_a_gpu_backend_started_is_an_error(monkeypatch):
  """The flag cannot act once the GPU backend runs: say so instead of promising reproducibility."""
  import jax

  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setattr(runtime, "_backends_started", lambda: True)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.raises(RuntimeError, match="before the first JAX computation"):
    runtime.configure(deterministic=True)
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")  # CPU runs are deterministic anyway
  runtime.configure(deterministic=True)
  assert os.environ["XLA_FLAGS"] == runtime.DETERMINISTIC_FLAG


def test_the_suite_runs_with_exact_matmuls_and_no_preallocation():
  import jax

  assert jax.config.jax_default_matmul_precision == "highest"
  assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
  assert runtime.DETERMINISTIC_FLAG in os.environ["XLA_FLAGS"].split()
