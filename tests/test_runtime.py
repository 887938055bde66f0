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


CACHE_PROBE = """
import json, os, sys
import jax, jax.numpy as jnp
from nlm_jax import runtime
used = runtime.compilation_cache(sys.argv[1])
jax.jit(lambda x: jnp.tanh(x) @ x.T)(jnp.ones((3, 3))).block_until_ready()
print(json.dumps({"used": used, "config": jax.config.jax_compilation_cache_dir,
                  "max_size": jax.config.jax_compilation_cache_max_size}))
"""


def _cache_env(**extra) -> dict:
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_COMPILATION_CACHE_DIR", "NLM_JAX_COMPILATION_CACHE", "NLM_JAX_CACHE")}
  return {**env, "JAX_PLATFORMS": "cpu", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **extra}


def _files(directory) -> list[str]:
  return [f for _, _, names in os.walk(directory) for f in names]


@pytest.mark.parametrize("extra,where", [({}, "given"), ({"NLM_JAX_COMPILATION_CACHE": "0"}, None),
                                         ({"JAX_COMPILATION_CACHE_DIR": "{tmp}/own"}, "own")])
def test_compilation_cache_is_kept_unless_turned_off_or_set_elsewhere(tmp_path, extra, where):
  env = _cache_env(**{k: v.format(tmp=tmp_path) for k, v in extra.items()})
  out = subprocess.run([sys.executable, "-c", CACHE_PROBE, str(tmp_path / "given")], env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  state = json.loads(out.stdout.strip().splitlines()[-1])
  used = state["used"]
  assert used == (None if where is None else str(tmp_path / where))
  if where == "given":  # bounded: least recently used programs go past 4 GiB
    assert state["max_size"] == runtime.COMPILATION_CACHE_MAX_BYTES == 4 << 30
  assert bool(_files(tmp_path / "given")) == (where == "given")
  if where == "own":
    assert _files(tmp_path / "own")


@pytest.mark.parametrize("value", ["0", "false", "off", "no", " OFF "])
def test_every_spelling_of_off_turns_the_compilation_cache_off(monkeypatch, tmp_path, value):
  import jax

  monkeypatch.setenv("NLM_JAX_COMPILATION_CACHE", value)
  before = jax.config.jax_compilation_cache_dir
  assert runtime.compilation_cache(str(tmp_path / "xla")) is None
  assert jax.config.jax_compilation_cache_dir == before and not (tmp_path / "xla").exists()


def test_deterministic_false_after_the_backend_started_leaves_the_flag(monkeypatch):
  """Once a backend runs, the flag has acted (or not) already: removing it would only make
  `deterministic_ops()` misreport what is in effect."""
  flags = f"--xla_force_host_platform_device_count=1 {runtime.DETERMINISTIC_FLAG}"
  monkeypatch.setenv("XLA_FLAGS", flags)
  monkeypatch.setattr(runtime, "_backends_started", lambda: True)
  runtime.configure(deterministic=False)
  assert os.environ["XLA_FLAGS"] == flags and runtime.deterministic_ops()
  monkeypatch.setattr(runtime, "_backends_started", lambda: False)  # before it starts: removed
  runtime.configure(deterministic=False)
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=1" and not runtime.deterministic_ops()


def test_nlm_jax_train_keeps_its_programs_for_the_next_process(tmp_path):
  from support import overrides, write_corpus

  corpus = write_corpus(tmp_path / "c.txt")
  env = _cache_env(NLM_JAX_CACHE=str(tmp_path / "cache"))
  for run in ("a", "b"):
    proc = subprocess.run([sys.executable, "-m", "nlm_jax", "train", *overrides(tmp_path / run, corpus, steps=3)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if run == "a":
      kept = sorted(_files(tmp_path / "cache" / "xla"))
      assert kept  # the train and eval steps, at least
  assert sorted(_files(tmp_path / "cache" / "xla")) == kept  # b compiled nothing new: it loaded a's programs
  losses = [[json.loads(line)["train_loss"] for line in open(tmp_path / r / "metrics.jsonl") if "train_loss" in line]
            for r in ("a", "b")]
  assert losses[0] == losses[1]
