"""What every experiment runner shares: training through the command line, and writing results."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def nlm_jax_train(workdir: str, overrides: list[str], config: str | None = None,
                  timeout: float | None = None) -> float:
  """`nlm-jax train [--config CONFIG] workdir=WORKDIR ...` from the repository root, quietly;
  returns its wall time. A failure stops the experiment with the command's last error lines.
  A run this function finished before (a kept `--runs` folder) is not started again: its first
  wall time, stored beside its summary.json, is returned, so a rerun reports the same times.
  `timeout` (seconds): a run still going then is stopped (its last checkpoint stays: resumable)."""
  stored = os.path.join(workdir, "experiment_wall_s.json")
  if os.path.exists(stored) and os.path.exists(os.path.join(workdir, "summary.json")):
    with open(stored) as f:
      return json.load(f)["wall_s"]
  argv = [sys.executable, "-m", "nlm_jax", "train", *(["--config", config] if config else []),
          f"workdir={workdir}", "train.progress=false", *overrides]
  t = time.perf_counter()
  try:
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    raise SystemExit(f"nlm-jax train of {workdir} stopped after {timeout:.0f} s (the time limit)") from None
  if proc.returncode:
    raise SystemExit(f"nlm-jax train failed for {workdir}:\n{proc.stderr[-2000:]}")
  wall = time.perf_counter() - t
  with open(stored, "w") as f:
    json.dump({"wall_s": wall}, f)
  return wall


def add_runs_argument(ap) -> None:
  ap.add_argument("--runs", default=None,
                  help="keep the runs' directories in this folder: rerunning the same command resumes them "
                       "(finished runs are not trained again) instead of starting over")


def scratch(prefix: str, runs: str | None = None) -> str:
  """The folder for an experiment's runs: `runs` (kept: `nlm-jax train` resumes what is there),
  else a temporary one whose run directories (checkpoints: up to hundreds of MB each) are removed
  when the experiment exits; files at its top (a quick run's results) are kept."""
  if runs:
    os.makedirs(runs, exist_ok=True)
    return os.path.abspath(runs)
  tmp = tempfile.mkdtemp(prefix=prefix)

  def remove_runs() -> None:
    for entry in os.scandir(tmp):
      if entry.is_dir():
        shutil.rmtree(entry.path, ignore_errors=True)

  atexit.register(remove_runs)
  return tmp


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
