"""What `train` reports: one name per number, the final evaluation (reused when the last periodic one
scored the whole split), nanoGPT's estimator as an option, progress for evaluation, honest times."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from support import metrics, overrides, run_cli, train, write_corpus

from nlm_jax import progress
from nlm_jax.training import trainer


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
  monkeypatch.setenv("NLM_JAX_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def corpus(tmp_path):
  return write_corpus(tmp_path / "corpus.txt")


def tensorboard_scalars(workdir) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value)]} from the run's event files (TFRecords of tensorboardX's Event protos)."""
  import struct

  from tensorboardX.proto import event_pb2

  out = {}
  for name in sorted(os.listdir(workdir / "tb")):
    data, i = (workdir / "tb" / name).read_bytes(), 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      for value in event.summary.value:
        out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


@pytest.fixture
def evaluations(monkeypatch):
  """Every Run.evaluate call as (split, max_batches, seed, batching)."""
  calls = []
  original = trainer.Run.evaluate

  def evaluate(self, params, split, max_batches, seed=0, batching=None):
    calls.append((split, max_batches, seed, batching))
    return original(self, params, split, max_batches, seed, batching)

  monkeypatch.setattr(trainer.Run, "evaluate", evaluate)
  return calls


def test_estimates_and_the_final_score_have_their_own_names(tmp_path, corpus, evaluations):
  workdir = tmp_path / "r"
  summary = train(*overrides(workdir, corpus, "lstm", "streams", steps=20, model__dropout=0.3))
  log = metrics(workdir)
  evals = [r for r in log if "val_loss" in r]
  assert [r["step"] for r in evals] == [10, 20]
  assert all("eval_train_loss" in r and "val_perplexity" in r for r in evals)
  assert all("train_loss" in r and not any(k.startswith("final_") for k in r) for r in log)  # one kind of line
  assert tensorboard_scalars(workdir)["final_validation_loss"] == [(20, pytest.approx(summary["final_validation_loss"]))]
  # train.eval_batches=4: the periodic numbers are estimates, the final one scores the whole split.
  assert ("validation", None, 0, None) in evaluations
  assert summary["final_validation_tokens"] == len(trainer.load_run(workdir)[0].corpus.tokens("validation")) - 1
  # eval_train_loss is the eval-mode (dropout off) loss of the same 4 fixed batches of training rows.
  run, params, _ = trainer.load_run(workdir)
  assert run.evaluate(params, "train", 4, seed=4)["loss"] == pytest.approx(evals[-1]["eval_train_loss"], rel=1e-6)
  assert evals[-1]["eval_train_loss"] != pytest.approx(log[-2]["train_loss"], rel=1e-3)
  code, out, err = run_cli("eval", "--workdir", workdir, "--json")
  assert code == 0, err
  assert json.loads(out)["loss"] == pytest.approx(summary["final_validation_loss"], rel=1e-6)


def test_the_final_evaluation_is_reused_when_the_last_one_scored_the_whole_split(tmp_path, corpus, evaluations):
  summary = train(*overrides(tmp_path / "r", corpus, "lstm", "streams", steps=20, train__eval_batches="null"))
  whole = [c for c in evaluations if c[0] == "validation"]
  assert len(whole) == 2 and all(c[1] is None for c in whole)  # steps 10 and 20: no third, final pass
  log = metrics(tmp_path / "r")
  assert summary["final_validation_loss"] == [r for r in log if "val_loss" in r][-1]["val_loss"]
  assert summary["final_eval_s"] < 0.5
  # The training split is sampled with as many batches as the validation split took.
  n_val, _ = trainer.load_run(tmp_path / "r")[0].eval_plan("validation", None)
  assert [c[1] for c in evaluations if c[0] == "train"] == [n_val, n_val]


@pytest.mark.parametrize("estimator", ["fixed", "random_windows"])
def test_estimators(tmp_path, corpus, evaluations, estimator):
  train(*overrides(tmp_path / "r", corpus, "lstm", "streams", steps=30, train__eval_estimator=estimator))
  periodic = [c for c in evaluations if c[1] is not None]
  assert len(periodic) == 6  # 3 evaluations × (validation, train)
  seeds = {split: [c[2] for c in periodic if c[0] == split] for split in ("validation", "train")}
  if estimator == "fixed":  # the same batches every time, the run's own batching
    assert seeds == {"validation": [4, 4, 4], "train": [4, 4, 4]} and {c[3] for c in periodic} == {"streams"}
  else:  # nanoGPT: fresh random windows of each split at every evaluation (a state reset per window)
    assert len(set(seeds["validation"] + seeds["train"])) == 6 and {c[3] for c in periodic} == {"windows"}
  code, _, err = run_cli("train", *overrides(tmp_path / "bad", corpus, train__eval_estimator="random_windows",
                                             train__eval_batches="null"))
  assert code == 2 and "train.eval_batches" in err and len(err.strip().splitlines()) == 1


def test_evaluation_progress_and_times(tmp_path, corpus, monkeypatch):
  bars = []
  real_bar = progress.bar

  def recording_bar(enabled, iterable=None, **kwargs):
    bar = real_bar(enabled, iterable, **kwargs)
    bars.append((kwargs.get("desc"), kwargs.get("total"), bar))
    return bar

  monkeypatch.setattr(progress, "bar", recording_bar)
  import tqdm as tqdm_module

  train_bars = []

  class RecordingTqdm(tqdm_module.tqdm):
    def close(self):
      if self.desc == "train":
        train_bars.append(self.format_dict["elapsed"])
      super().close()

  monkeypatch.setattr(tqdm_module, "tqdm", RecordingTqdm)
  original = trainer.Run.periodic_evaluation

  def slow_evaluation(self, params, step):
    time.sleep(1.5)
    return original(self, params, step)

  monkeypatch.setattr(trainer.Run, "periodic_evaluation", slow_evaluation)
  summary = train(*overrides(tmp_path / "r", corpus, "lstm", "streams", steps=20, train__progress="true"))
  evals = [(desc, total, bar) for desc, total, bar in bars if desc and desc.startswith("eval")]
  assert {desc for desc, _, _ in evals} == {"eval validation", "eval train"}
  assert all(bar.n == total and total > 0 for _, total, bar in evals)  # each bar follows its batches to the end
  # The training bar's clock leaves out the two 1.5 s evaluations; the summary's wall time does not.
  assert train_bars and train_bars[0] < summary["loop_time_s"] - 2.9
  assert summary["wall_time_s"] >= summary["loop_time_s"] + summary["final_eval_s"]


def test_eval_train_batches_sets_or_skips_the_training_sample(tmp_path, corpus, evaluations):
  train(*overrides(tmp_path / "a", corpus, "lstm", "streams", steps=10, train__eval_train_batches=2))
  assert [c[1] for c in evaluations if c[0] == "train"] == [2]
  evaluations.clear()
  train(*overrides(tmp_path / "b", corpus, "lstm", "streams", steps=10, train__eval_train_batches=0))
  assert not [c for c in evaluations if c[0] == "train"]
  assert not any("eval_train_loss" in r for r in metrics(tmp_path / "b"))


def test_metrics_writer_does_not_import_torch(tmp_path):
  """tensorboardX imports torch when it is installed (seconds of every run's start-up); the
  writer is imported without it. A `torch` that fails on import stands in for an installed one."""
  (tmp_path / "torch").mkdir()
  (tmp_path / "torch" / "__init__.py").write_text("raise RuntimeError('torch was imported')\n")
  code = ("import sys; from nlm_jax.training import trainer; w = trainer._summary_writer()(sys.argv[1]); "
          "w.add_scalar('loss', 1.5, 1); w.close(); assert 'torch' not in sys.modules")
  env = dict(os.environ, PYTHONPATH=str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "tb")], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert tensorboard_scalars(tmp_path)["loss"] == [(1, 1.5)]
