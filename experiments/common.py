"""What every experiment runner shares: training through the command line, and writing results."""

from __future__ import annotations

import atexit
import concurrent.futures
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def nlm_jax_train(workdir: str, overrides: list[str], config: str | None = None,
                  timeout: float | None = None) -> float:
  """`nlm-jax train [--config CONFIG] workdir=WORKDIR ...` from the repository root, quietly;
  returns its wall time. A failure stops the experiment with the command's last error lines.
  A run this function finished before (a kept `--runs` folder) is not started again: its first
  wall time, stored beside its summary.json, is returned, so a rerun reports the same times.
  `timeout` (seconds): a run still going then is stopped (SIGTERM: it saves a checkpoint, so it
  resumes; see `nlm_jax_command`). One stopped after it finished, its summary.json written (in its
  final evaluation's last moments or on its way out), counts as finished."""
  stored, summary = os.path.join(workdir, "experiment_wall_s.json"), os.path.join(workdir, "summary.json")
  if os.path.exists(stored) and os.path.exists(summary):
    with open(stored) as f:
      return json.load(f)["wall_s"]
  argv = ["train", *(["--config", config] if config else []), f"workdir={workdir}", "train.progress=false",
          *overrides]
  t, started = time.perf_counter(), time.time()
  try:
    code, _, err = nlm_jax_command(argv, timeout, f"nlm-jax train of {workdir}")
  except SystemExit:
    if not (os.path.exists(summary) and os.path.getmtime(summary) >= started and _complete(summary)):
      raise
    code = 0
  if code:
    raise SystemExit(f"nlm-jax train failed for {workdir}:\n{err[-2000:]}")
  wall = time.perf_counter() - t
  with open(stored, "w") as f:
    json.dump({"wall_s": wall}, f)
  return wall


def _complete(summary_path: str) -> bool:
  """Whether a summary.json is a finished run's: it holds the final evaluation (final_*)."""
  try:
    with open(summary_path) as f:
      return any(k.startswith("final_") for k in json.load(f))
  except (OSError, ValueError):
    return False


_IN_PROCESS = False
STOP_GRACE_S = 10.0  # after SIGTERM, how long a stopped run has to save a checkpoint and exit


def train_in_process(enabled: bool) -> None:
  """Quick modes (what CI runs): `nlm_jax_train` calls the command line's main() in this process,
  one run after the other, instead of starting a process per run: each run then saves the ~3-4 s
  a new Python spends importing JAX, Flax, Optax and Orbax, most of a tiny run's time. Full runs
  keep their own processes (a time limit can stop them, their wall times include a start-up as a
  user's would, and `--jobs` runs them side by side)."""
  global _IN_PROCESS
  _IN_PROCESS = enabled
  if enabled:  # before anything starts a backend: each run would set it (train.deterministic), on a
    # GPU too late once the runner or a first run has started one
    from nlm_jax import runtime

    runtime.configure(deterministic=True)


def nlm_jax_command(argv: list[str], timeout: float | None = None, what: str = "nlm-jax") -> tuple[int, str, str]:
  """`nlm-jax ARGV` from the repository root: (exit code, stdout, stderr). Its own process, stopped
  after `timeout` seconds (SystemExit naming `what`), or this one (`train_in_process`)."""
  if _IN_PROCESS:
    return _in_process(argv)
  proc = subprocess.Popen([sys.executable, "-m", "nlm_jax", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.terminate()  # SIGTERM: a training run saves a checkpoint and stops (SIGKILL if it takes too long)
    try:
      proc.communicate(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.communicate()
    raise SystemExit(f"{what} stopped after {timeout:.0f} s (the time limit)") from None
  return proc.returncode, out, err


def _in_process(argv: list[str]) -> tuple[int, str, str]:
  """`nlm-jax ARGV` in this process, from the repository root: (exit code, stdout, stderr)."""
  import contextlib
  import io
  import threading

  from nlm_jax import cli

  if threading.current_thread() is not threading.main_thread():
    raise RuntimeError("in-process runs go one at a time, from the main thread (--jobs 1)")
  out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
  try:
    os.chdir(ROOT)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      code = cli.main(argv)
  finally:
    os.chdir(here)
  return code, out.getvalue(), err.getvalue()


def train_summary(workdir: str, overrides: list[str], config: str | None = None,
                  timeout: float | None = None) -> dict:
  """`nlm_jax_train`, then the run's summary.json, with the command's wall time as "wall_s"."""
  wall = nlm_jax_train(workdir, overrides, config, timeout)
  with open(os.path.join(workdir, "summary.json")) as f:
    return {**json.load(f), "wall_s": wall}


def add_runs_argument(ap) -> None:
  ap.add_argument("--runs", default=None,
                  help="keep the runs' directories in this folder: rerunning the same command resumes them "
                       "(finished runs are not trained again) instead of starting over")


def add_jobs_argument(ap, default: int) -> None:
  ap.add_argument("--jobs", type=int, default=default,
                  help=f"runs at a time (default {default}); on 2 CPU cores two `nlm-jax train` processes at once "
                       "finish ~25%% sooner than one after the other (one's start-up, data loading and "
                       "compilation overlap the other's training); the results do not depend on it")


def run_parallel(tasks: list[Callable[[], T]], jobs: int) -> list[T]:
  """Calls every task, `jobs` at a time, and returns their results in the tasks' order. Threads
  suffice: a task spends its time waiting on its `nlm-jax` process. The first failure cancels
  the tasks not yet started and is raised once the running ones are done."""
  if jobs <= 1 or _IN_PROCESS:  # in-process runs go one at a time
    return [task() for task in tasks]
  with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
    futures = [pool.submit(task) for task in tasks]
    try:
      return [future.result() for future in futures]
    except BaseException:
      pool.shutdown(cancel_futures=True)
      raise


def scratch(prefix: str, runs: str | None = None) -> str:
  """The folder for an experiment's runs: `runs` (kept: `nlm-jax train` resumes what is there),
  else a temporary one whose run directories (checkpoints: up to hundreds of MB each) are removed
  when the experiment exits; files at its top (a quick run's results) are kept.

  The runs started from here share one persistent XLA compilation cache in the folder (unless
  $JAX_COMPILATION_CACHE_DIR is set): a run whose programs an earlier run compiled (another seed,
  another optimizer over the same model) loads them instead of compiling again, saving seconds per
  run; the compiled programs, hence the results, are the same."""
  folder = os.path.abspath(runs) if runs else tempfile.mkdtemp(prefix=prefix)
  os.makedirs(folder, exist_ok=True)
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(folder, "xla_cache"))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  if runs:
    return folder

  def remove_runs() -> None:
    for entry in os.scandir(folder):
      if entry.is_dir():
        shutil.rmtree(entry.path, ignore_errors=True)

  atexit.register(remove_runs)
  return folder


def mean_std(xs: list[float], digits: int) -> str:
  """'mean ± std' over seeds ('mean' alone for one value, '—' for none), `digits` decimals."""
  if not xs:
    return "—"
  if len(xs) == 1:
    return f"{xs[0]:.{digits}f}"
  return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def write_results(out: str, table: str, payload: dict, update_readme: bool) -> None:
  """results.json and results.md in `out`; with `update_readme`, the table also replaces what
  stands between the results markers of out/README.md."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(payload, f, indent=2)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(table + "\n")
  readme = os.path.join(out, "README.md")
  if update_readme and os.path.exists(readme):
    with open(readme) as f:
      text = f.read()
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    i, j = text.index(start) + len(start), text.index(end)
    with open(readme, "w") as f:
      f.write(text[:i] + "\n" + table + "\n" + text[j:])


def unigram_perplexity(overrides: list[str], workdir: str) -> float:
  """Validation perplexity of the training split's token frequencies (add-one smoothed), for the
  data `overrides` describe, with the vocabulary of the finished run in `workdir`: where 'has
  learnt anything beyond token frequencies' starts."""
  import numpy as np

  from nlm_jax.config import load_config
  from nlm_jax.data import corpus, tokenizers

  cfg = load_config(None, [*overrides, f"workdir={workdir}"])
  data = corpus.Corpus(cfg.data, cfg.tokenizer, tokenizers.load(os.path.join(workdir, "tokenizer.json")))
  counts = np.bincount(data.tokens("train"), minlength=data.tokenizer.vocab_size) + 1.0
  return float(np.exp(-np.mean(np.log((counts / counts.sum())[data.tokens("validation")]))))
