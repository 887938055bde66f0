"""Each experiment's --quick mode runs end to end on generated data and writes its table and plot."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_quick(experiment: str, out, seeds: int) -> dict:
  """`python -m experiments.EXPERIMENT.run --quick` into `out`; its results.json."""
  proc = subprocess.run([sys.executable, "-m", f"experiments.{experiment}.run", "--quick", "--seeds", str(seeds),
                         "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / "results.json") as f:
    return json.load(f)


def test_ngram_vs_neural_quick(tmp_path):
  rows = run_quick("ngram_vs_neural", tmp_path, seeds=2)["rows"]
  assert len(rows) == 6
  kn3, kn5 = rows["Kneser–Ney n=3 (modified, interpolated)"], rows["Kneser–Ney n=5 (modified, interpolated)"]
  assert 1.0 < kn3["test_ppl"][0] < 20 and 1.0 < kn5["test_ppl"][0] < 20  # a 30-word grammar
  for name, row in rows.items():
    assert len(row["test_ppl"]) == (1 if name.startswith("Kneser") else 2)
  mixed = rows["mixture NPLM (direct on) + KN n=5, λ on validation"]
  # λ = 0 is in the grid: the mixture is never worse than KN alone on validation, so on test only
  # by the split's difference.
  assert all(p <= kn5["test_ppl"][0] * 1.05 for p in mixed["test_ppl"])
  assert (tmp_path / "test_perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "QUICK MODE" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_positional_encodings_quick(tmp_path):
  results = run_quick("positional_encodings", tmp_path, seeds=1)["results"]
  assert set(results) == {"sinusoidal", "learned", "rotary", "none"}
  assert results["learned"]["256"] == [] and len(results["rotary"]["256"]) == 1  # no rows past 64 to learn
  assert all(np.isfinite(results[e]["64"][0]) for e in results)
  assert (tmp_path / "loss_by_position.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_long_range_quick(tmp_path):
  results = run_quick("long_range", tmp_path, seeds=1)
  for arch in ("rnn", "lstm"):
    for state in ("initialization", "trained"):
      g = np.asarray(results["gradients"][arch][state])
      assert g.shape == (20,) and np.all(np.isfinite(g)) and np.all(g > 0)
  assert set(results["copy"]) == {"rnn", "lstm", "transformer"}
  assert all(0.0 <= x <= 1.0 for by_gap in results["copy"].values() for xs in by_gap.values() for x in xs)
