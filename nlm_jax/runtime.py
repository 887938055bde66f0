"""Device facts in one place: determinism, matmul precision and GPU memory, set before JAX starts.

The command line calls `configure` from the run's config (`train.deterministic`) before it
touches a device; the test suite calls it from `tests/conftest.py`. Library users call it once,
before their first JAX computation:

    import nlm_jax.runtime
    nlm_jax.runtime.configure(deterministic=True)          # bitwise-reproducible GPU runs
    nlm_jax.runtime.configure(matmul_precision="highest")  # exact float32 matmuls everywhere

Why each setting exists:
- deterministic: on a GPU, XLA's scatter-add (the gradient of a gather, e.g. an embedding lookup)
  and some reductions use atomics whose summation order varies from run to run, so the same seed
  gives different bits by the 7th digit after a few steps. `--xla_gpu_deterministic_ops=true`
  makes XLA pick deterministic algorithms; it must be in XLA_FLAGS before the GPU backend starts.
  CPU and TPU runs are deterministic without it (the flag is harmless there).
- matmul_precision: float32 matrix products run as TF32 on Ampere/Hopper GPUs by default
  (~1e-3 relative error); 'highest' makes them exact float32. A model's own
  `matmul_precision` field scopes the same setting to that model.
- preallocate=False: by default JAX reserves 75% of GPU memory per process, so several
  processes on one GPU (pytest -n 2, two runs side by side) fail to start.
- compilation_cache (`nlm-jax` calls it; library users may): XLA's compiled programs are kept on
  disk, so the next process that builds the same program (another seed, a resume, `eval` after
  `train`) loads it instead of compiling again. A cached program is the same program, and on a
  GPU it also carries the algorithms autotuning picked, so processes no longer each time their
  own choice.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Optional

DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def _backends_started() -> bool:
  from jax._src import xla_bridge

  if hasattr(xla_bridge, "backends_are_initialized"):
    return xla_bridge.backends_are_initialized()
  return bool(getattr(xla_bridge, "_backends", None))


def _xla_flags() -> list[str]:
  return os.environ.get("XLA_FLAGS", "").split()


def configure(deterministic: Optional[bool] = None, matmul_precision: Optional[str] = None,
              preallocate: Optional[bool] = None) -> None:
  """Applies the settings given (None leaves a setting as it is). Call before JAX starts its
  backend; `deterministic=True` after a GPU backend started without the flag raises RuntimeError
  (the flag can no longer take effect)."""
  if preallocate is not None:
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "true" if preallocate else "false"
  if deterministic:
    flags = [f for f in _xla_flags() if not f.startswith("--xla_gpu_deterministic_ops")]
    already = DETERMINISTIC_FLAG in _xla_flags()
    if not already:
      if _backends_started():
        import jax

        if jax.default_backend() in _GPU_PLATFORMS:
          raise RuntimeError(
              "nlm_jax.runtime.configure(deterministic=True) came after the GPU backend started; call it "
              f"before the first JAX computation, or set XLA_FLAGS={DETERMINISTIC_FLAG}")
        logging.debug("deterministic ops: backend %s already started (deterministic anyway)",
                      jax.default_backend())
      os.environ["XLA_FLAGS"] = " ".join(flags + [DETERMINISTIC_FLAG])
  elif deterministic is False and DETERMINISTIC_FLAG in _xla_flags() and not _backends_started():
    os.environ["XLA_FLAGS"] = " ".join(f for f in _xla_flags() if f != DETERMINISTIC_FLAG)
  if matmul_precision is not None:
    import jax

    jax.config.update("jax_default_matmul_precision", matmul_precision)


def deterministic_ops() -> bool:
  """Whether XLA's deterministic-ops flag is set (`configure(deterministic=True)`)."""
  return DETERMINISTIC_FLAG in _xla_flags()


def describe() -> dict:
  """What is in effect: backend, devices, determinism flag, matmul precision (for run summaries)."""
  import jax

  return {"backend": jax.default_backend(), "devices": jax.device_count(),
          "device_kind": jax.devices()[0].device_kind,
          "deterministic_ops": deterministic_ops(),
          "matmul_precision": jax.config.jax_default_matmul_precision}


COMPILATION_CACHE_MAX_BYTES = 4 << 30  # least recently used programs go past this


def compilation_cache(directory: str) -> Optional[str]:
  """Keeps XLA's compiled programs in `directory` (bounded: least recently used past 4 GiB),
  unless a cache is set already ($JAX_COMPILATION_CACHE_DIR, jax.config) or
  $NLM_JAX_COMPILATION_CACHE=0 turns it off. Returns the directory in use (None: none)."""
  import jax

  if os.environ.get("NLM_JAX_COMPILATION_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
    return None
  current = os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir
  if current:
    return current
  jax.config.update("jax_compilation_cache_dir", directory)
  # JAX bounds the cache with file locks (`filelock`, a dependency); asked to without it, it
  # turns the whole cache off
  if importlib.util.find_spec("filelock") is not None:
    jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_MAX_BYTES)
  else:
    logging.warning("no `filelock` package: the compilation cache in %s is not bounded", directory)
  return directory
