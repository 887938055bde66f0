"""End-to-end: train → eval → generate for every architecture; determinism; exact resume."""

from __future__ import annotations

import json
import math
import os
import shutil

import jax
import numpy as np
import pytest

from support import assert_trees_equal, final_state, metrics, overrides, run_cli, train, write_corpus


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
  monkeypatch.setenv("NLM_JAX_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def corpus(tmp_path):
  return write_corpus(tmp_path / "corpus.txt")


@pytest.mark.parametrize("arch,batching,lr", [("transformer", "windows", 3e-3), ("lstm", "streams", 2e-2),
                                              ("rnn", "streams", 1e-2), ("fnn", "windows", 1e-2)])
def test_train_eval_generate(tmp_path, corpus, arch, batching, lr):
  workdir = tmp_path / "run"
  summary = train(*overrides(workdir, corpus, arch, batching, steps=40, optim__lr=lr))
  log = [r for r in metrics(workdir) if "val_loss" in r]
  vocab = len(json.load(open(workdir / "tokenizer.json"))["chars"])
  # Learned something: far below the uniform loss log |V|, and lower than at the start.
  assert log[-1]["val_loss"] < log[0]["val_loss"]
  assert summary["final_validation_loss"] < math.log(vocab) - 0.5
  for name in ("resolved_config.yaml", "tokenizer.json", "metrics.jsonl", "summary.json"):
    assert (workdir / name).exists()
  assert any(f.startswith("events") for f in os.listdir(workdir / "tb"))

  code, out, err = run_cli("eval", "--workdir", workdir, "--split", "validation", "--json")
  assert code == 0, err
  result = json.loads(out)
  # eval of the final checkpoint scores the same tokens as the run's final evaluation.
  assert result["loss"] == pytest.approx(summary["final_validation_loss"], rel=1e-6)
  assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-9)
  assert result["bits_per_char"] == pytest.approx(result["loss"] / math.log(2), rel=1e-9)

  gen = lambda seed: run_cli("generate", "--workdir", workdir, "--prompt", "the ", "--max-new-tokens", 30,
                             "--seed", seed, "--top-k", 5)
  (c1, t1, _), (c2, t2, _), (c3, t3, _) = gen(1), gen(1), gen(2)
  assert c1 == c2 == c3 == 0
  assert t1 == t2 and t1.startswith("the ") and len(t1.rstrip("\n")) == len("the ") + 30
  assert t1 != t3


def test_same_seed_is_bitwise_identical(tmp_path, corpus):
  extra = {"model__dropout": 0.1}
  train(*overrides(tmp_path / "a", corpus, steps=20, **extra))
  train(*overrides(tmp_path / "b", corpus, steps=20, **extra))
  strip = lambda log: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in log]
  assert strip(metrics(tmp_path / "a")) == strip(metrics(tmp_path / "b"))
  assert_trees_equal(final_state(tmp_path / "a"), final_state(tmp_path / "b"))
  train(*overrides(tmp_path / "c", corpus, steps=20, seed=4, **extra))
  assert metrics(tmp_path / "c")[0]["train_loss"] != metrics(tmp_path / "a")[0]["train_loss"]


@pytest.mark.parametrize("arch,batching,extra", [
    ("transformer", "windows", {"model__dropout": 0.1}),
    ("lstm", "streams", {"model__dropout": 0.2, "optim__grad_accum": 2}),
])
def test_stop_and_resume_is_bitwise_identical(tmp_path, corpus, arch, batching, extra):
  args = lambda d: overrides(tmp_path / d, corpus, arch, batching, steps=25, **extra)
  train(*args("straight"))
  stopped = train(*args("resumed"), "train.stop_after=13")
  assert stopped["steps"] == 13 and stopped["latest_checkpoint"] == 13
  resumed = train(*args("resumed"))
  assert resumed["steps"] == 25
  assert_trees_equal(final_state(tmp_path / "straight"), final_state(tmp_path / "resumed"))
  # The validation curve after the resume point is the uninterrupted one.
  val = lambda d: [(r["step"], r["val_loss"]) for r in metrics(tmp_path / d) if "val_loss" in r]
  assert val("straight") == val("resumed")
  # So is the whole training log (but wall-clock rates), and the record at step 15 averages steps
  # 11-15 in both: the stop at 13 (between records) logged its window and its checkpoint carried it
  strip = lambda log: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in log]
  resumed_log = metrics(tmp_path / "resumed")
  assert [r["step"] for r in resumed_log if r["step"] == 13] == [13]
  assert strip(metrics(tmp_path / "straight")) == strip([r for r in resumed_log if r["step"] != 13])


def test_plateau_schedule_decays_lr(tmp_path, corpus):
  # A learning rate so small that validation cannot improve: every evaluation is a plateau.
  train(*overrides(tmp_path / "p", corpus, "lstm", "streams", steps=30, optim__name="sgd", optim__lr=1e-9,
                   optim__schedule="plateau", optim__plateau_factor=0.25, optim__plateau_patience=1))
  lrs = [r["lr"] for r in metrics(tmp_path / "p") if "lr" in r]
  assert lrs[0] == pytest.approx(1e-9)
  assert min(lrs) < 1e-9 * 0.25 + 1e-20


def test_the_plateau_scale_multiplies_the_train_step_s_update():
  """θ ← θ − η s g: one SGD step with the plateau scale s = 0.25 moves every parameter exactly a
  quarter as far as the same step with s = 1."""
  import jax.numpy as jnp

  from nlm_jax import models, parallel
  from nlm_jax.config import OptimConfig
  from nlm_jax.training import optim
  from nlm_jax.training.steps import LMTask

  cfg = OptimConfig(name="sgd", lr=0.5)
  model = models.build(models.TransformerConfig(vocab_size=13, d_model=16, n_heads=2, n_layers=1, d_ff=32, context=8))
  task = LMTask(model, optim.make_optimizer(cfg, 10), optim.plateau(cfg), parallel.make_mesh(devices=jax.devices()[:1]),
                batch_size=2, carry_state=False, example_len=8)
  tokens = np.random.default_rng(0).integers(0, 13, (2, 9)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": np.ones((2, 8), np.float32),
           "reset": np.ones((2,), bool)}
  init = lambda: task.init(jax.random.key_data(jax.random.key(0)))  # the same state each call (steps donate it)
  theta = jax.device_get(init().params)
  full, _ = task.train_step(init(), batch)
  state = init()
  state = state.replace(plateau=state.plateau._replace(scale=jnp.asarray(0.25, state.plateau.scale.dtype)))
  quarter, _ = task.train_step(state, batch)
  full_step = jax.tree.map(lambda new, old: np.asarray(new) - old, jax.device_get(full.params), theta)
  quarter_step = jax.tree.map(lambda new, old: np.asarray(new) - old, jax.device_get(quarter.params), theta)
  assert max(float(np.abs(d).max()) for d in jax.tree.leaves(full_step)) > 1e-3  # the step moved them
  jax.tree.map(lambda q, f: np.testing.assert_allclose(q, 0.25 * f, rtol=1e-4, atol=1e-7), quarter_step, full_step)


def test_reset_carry_restarts_exactly_the_rows_marked():
  """A new epoch of the streams: the rows with reset=True take the initial state, in every leaf of the
  carry whatever its rank and dtype (LSTM (c, h), an FNN's window of ids, a KV cache); the others keep theirs."""
  import jax.numpy as jnp

  from nlm_jax.training.steps import reset_carry

  rng = np.random.default_rng(0)
  carry = {"lstm": (rng.standard_normal((2, 5)).astype(np.float32), rng.standard_normal((2, 5)).astype(np.float32)),
           "window": rng.integers(0, 9, (2, 3)).astype(np.int32),
           "kv": rng.standard_normal((2, 4, 2, 3)).astype(np.float32)}
  initial = {"lstm": (np.zeros((2, 5), np.float32), np.full((2, 5), 0.5, np.float32)),
             "window": np.full((2, 3), 11, np.int32), "kv": np.zeros((2, 4, 2, 3), np.float32)}
  for reset in ([True, False], [False, True], [True, True], [False, False]):
    out = reset_carry(carry, initial, jnp.asarray(reset))
    for got, c, c0 in zip(jax.tree.leaves(out), jax.tree.leaves(carry), jax.tree.leaves(initial)):
      assert got.shape == c.shape and got.dtype == c.dtype
      for b in range(2):
        np.testing.assert_array_equal(got[b], c0[b] if reset[b] else c[b])


def test_init_from_copies_params_only(tmp_path, corpus):
  train(*overrides(tmp_path / "pre", corpus, steps=10))
  summary = train(*overrides(tmp_path / "fine", corpus, steps=10, train__init_from=tmp_path / "pre",
                             optim__name="sgd", optim__lr=1e-30))
  assert summary["steps"] == 10
  pre = final_state(tmp_path / "pre")["params"]
  fine = final_state(tmp_path / "fine")["params"]
  for a, b in zip(jax.tree.leaves(pre), jax.tree.leaves(fine)):  # lr ~0: the pretrained params
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-20)


def test_plot(tmp_path, corpus):
  train(*overrides(tmp_path / "r", corpus, steps=10))
  code, out, err = run_cli("plot", "--workdir", tmp_path / "r")
  assert code == 0, err
  png = out.strip()
  assert png.endswith(".png") and open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  # --output: a name without a suffix gets a PNG at that very path (matplotlib added .png and the
  # printed path did not exist); a suffix matplotlib cannot write is a one-line error, not a traceback
  code, out, err = run_cli("plot", "--workdir", tmp_path / "r", "--output", tmp_path / "curves")
  assert code == 0 and out.strip() == str(tmp_path / "curves"), err
  assert open(tmp_path / "curves", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  code, out, err = run_cli("plot", "--workdir", tmp_path / "r", "--output", tmp_path / "curves.txt")
  assert code == 2 and "Traceback" not in err and "no .txt files" in err and not (tmp_path / "curves.txt").exists()


def test_sigint_saves_a_checkpoint_and_the_run_resumes(tmp_path, corpus):
  import signal
  import subprocess
  import sys
  import time

  workdir = tmp_path / "r"
  args = overrides(workdir, corpus, steps=100000, train__log_every=1, train__eval_every=100000)
  proc = subprocess.Popen([sys.executable, "-m", "nlm_jax", "train", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=dict(os.environ))
  deadline = time.time() + 300
  while not (workdir / "metrics.jsonl").exists() or not metrics(workdir):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
    time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 2 and "interrupted at step" in err, err[-2000:]
  step = int(err.split("interrupted at step")[1].split(";")[0])
  assert os.path.isdir(workdir / "checkpoints" / str(step))
  resumed = train(*args, f"train.stop_after={step + 3}")
  assert resumed["steps"] == step + 3


def test_a_partly_written_checkpoint_is_never_resumed_from(tmp_path, corpus):
  """Orbax writes a step into a temporary directory and renames it when complete; a save cut
  short leaves only such a directory, which resume skips. A step directory without Orbax's commit
  marker (a copy cut short) is passed over with a one-line warning naming it, and moved aside
  (not deleted) so that the resumed run can save that step again."""
  workdir = tmp_path / "r"
  args = overrides(workdir, corpus, steps=20, train__checkpoint_every=5)
  train(*args, "train.stop_after=10")
  ckpts = workdir / "checkpoints"
  (ckpts / "15.orbax-checkpoint-tmp-1700000000").mkdir()
  (ckpts / "15.orbax-checkpoint-tmp-1700000000" / "state").write_text("half a checkpoint")
  resumed = train(*args, "train.stop_after=12")
  log = metrics(workdir)
  assert resumed["steps"] == 12 and log[-1]["step"] == 12  # resumed from 10, not 15
  assert [r["step"] for r in log] == sorted(r["step"] for r in log)
  incomplete = workdir / "checkpoints" / "20"
  shutil.copytree(workdir / "checkpoints" / "12", incomplete)
  (incomplete / "commit_success.txt").unlink()
  code, out, err = run_cli("train", *args)
  warnings = [line for line in err.splitlines() if line.startswith("nlm-jax: warning:")]
  assert code == 0 and len(warnings) == 1 and "checkpoints/20 is not used: incomplete" in warnings[0], err
  assert (workdir / "checkpoints.damaged" / "20" / "state").is_dir()
  assert json.loads(out[out.index("{"):])["steps"] == 20 and metrics(workdir)[-1]["step"] == 20


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
  """The same 25 steps (checkpoints every 5, all kept; evaluations at 10, 20 and 25, the last one
  made 1 nat worse than the run's): "straight", uninterrupted; "resumed", stopped at 17, put back to
  its step-10 checkpoint (15 and 17 deleted, their records still in metrics.jsonl), stopped by a stop
  request at 13 (between records, after the checkpoint at 10) and resumed to the end.
  (directory, {name: summary}, the stop's exit code and stderr)."""
  from nlm_jax.training import trainer

  d = tmp_path_factory.mktemp("interrupted")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("NLM_JAX_CACHE", str(d / "cache"))
    evaluate = trainer.Run.periodic_evaluation

    def worse_at_25(self, params, step):
      scores, val = evaluate(self, params, step)
      if step == 25:
        val = {**val, "loss": val["loss"] + 1.0}
        scores = {**scores, "val_loss": val["loss"]}
      return scores, val

    mp.setattr(trainer.Run, "periodic_evaluation", worse_at_25)
    corpus = write_corpus(d / "corpus.txt")
    args = lambda name: overrides(d / name, corpus, steps=25, train__checkpoint_every=5,
                                  train__keep_checkpoints=10)
    summaries = {"straight": train(*args("straight"))}
    train(*args("resumed"), "train.stop_after=17")
    for step in (15, 17):
      shutil.rmtree(d / "resumed" / "checkpoints" / str(step))
    with pytest.MonkeyPatch.context() as stop:
      stop.setattr(trainer, "_stop_agreed", lambda requests, step, every: step == 13)
      code, _, err = run_cli("train", *args("resumed"))
    summaries["resumed"] = train(*args("resumed"))
  return d, summaries, code, err


def test_a_stop_request_between_records_saves_its_step_and_the_resumed_log_is_the_uninterrupted_one(interrupted):
  """A stop request at 13 (the last checkpoint at 10) saves checkpoint 13 with the steps 11-13 it
  has not logged; the resume drops the records past its step (those of the run stopped at 17), so
  metrics.jsonl is the uninterrupted run's (steps strictly increasing, record 15 averaging 11-15),
  and tokens_seen counts every step, not only the resumed invocation's."""
  d, summaries, code, err = interrupted
  assert code == 2 and "interrupted at step 13" in err, err[-2000:]
  assert os.path.isdir(d / "resumed" / "checkpoints" / "13")
  strip = lambda log: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in log]
  steps = [r["step"] for r in metrics(d / "resumed")]
  assert steps == sorted(set(steps)) == [5, 10, 15, 20, 25]
  assert strip(metrics(d / "straight")) == strip(metrics(d / "resumed"))
  assert summaries["resumed"]["steps"] == 25
  assert summaries["resumed"]["tokens_seen"] == summaries["straight"]["tokens_seen"] == 25 * 8 * 16


def test_evaluations_at_eval_every_and_the_last_step_and_only_their_checkpoints_carry_a_val_loss(interrupted):
  """steps=25, eval_every=10: val_loss at 10, 20 and 25; of the checkpoints (every 5) only those
  of evaluation steps carry a val_loss (no stale one), and best_checkpoint is the step of the lowest
  val_loss (20: the last evaluation is the worst), not the latest."""
  from nlm_jax.training.checkpoint import Checkpoints

  d, summaries, _, _ = interrupted
  for name in ("straight", "resumed"):
    log = metrics(d / name)
    val = {r["step"]: r["val_loss"] for r in log if "val_loss" in r}
    assert sorted(val) == [10, 20, 25]
    ckpts = Checkpoints(str(d / name), read_only=True)
    carried = {s: (ckpts.manager.metrics(s) or {}).get("val_loss") for s in ckpts.manager.all_steps()}
    ckpts.close()
    assert {s for s, v in carried.items() if v is not None} == {10, 20, 25}
    for s in (10, 20, 25):
      assert carried[s] == pytest.approx(val[s], rel=1e-6)
    best = min(val, key=val.get)
    assert best == 20 and summaries[name]["best_checkpoint"] == best
    assert summaries[name]["latest_checkpoint"] == 25


def test_eval_best_passes_over_a_damaged_best_checkpoint(interrupted, tmp_path):
  """--best with the best checkpoint (20) damaged: one warning naming it, and the newest intact
  checkpoint (25) is scored."""
  d, _, _, _ = interrupted
  workdir = tmp_path / "r"
  shutil.copytree(d / "straight", workdir)
  state = workdir / "checkpoints" / "20" / "state"
  largest = max((os.path.join(r, f) for r, _, fs in os.walk(state) for f in fs), key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.seek(os.path.getsize(largest) // 2)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0xFF]))
  code, out, err = run_cli("eval", "--workdir", workdir, "--best", "--json")
  assert code == 0, err[-3000:]
  warnings = [line for line in err.splitlines() if line.startswith("nlm-jax: warning:")]
  assert len(warnings) == 1 and "best checkpoint" in warnings[0] and "checkpoints/20 is not used" in warnings[0]
  assert json.loads(out)["step"] == 25


def test_train_loss_weighs_each_step_by_its_counted_tokens(tmp_path, corpus, monkeypatch):
  """A record's train_loss is Σ nll / Σ counted targets over its window's steps, not the mean of
  the steps' means: here every other step counts only 4 of its 16 targets per row."""
  from nlm_jax.training import trainer

  calls, windows = [0], []
  global_batch, mean_loss = trainer.Run.global_batch, trainer._finite_mean_loss

  def masked(self, batch, batch_size):
    calls[0] += 1
    if calls[0] % 2:
      batch = {**batch, "mask": (batch["mask"] * (np.arange(batch["mask"].shape[-1]) < 4)).astype(np.float32)}
    return global_batch(self, batch, batch_size)

  def seen(fetched, *rest):
    windows.append([(float(m["nll_sum"]), float(m["count"])) for m in fetched])
    return mean_loss(fetched, *rest)

  monkeypatch.setattr(trainer.Run, "global_batch", masked)
  monkeypatch.setattr(trainer, "_finite_mean_loss", seen)
  train(*overrides(tmp_path / "r", corpus, steps=10))
  log = metrics(tmp_path / "r")
  assert [r["step"] for r in log] == [5, 10] and len(windows) == 2
  for record, window in zip(log, windows):
    assert len({c for _, c in window}) == 2  # two token counts in the window
    expected = sum(n for n, _ in window) / sum(c for _, c in window)
    assert record["train_loss"] == pytest.approx(expected, rel=1e-6)
    assert record["train_loss"] != pytest.approx(sum(n / c for n, c in window) / len(window), rel=1e-4)


def test_logged_lr_is_the_one_of_the_window_s_last_update_and_rates_leave_out_evaluations(tmp_path, corpus,
                                                                                           monkeypatch):
  """With a 10-step linear warm-up, the record at step s logs the learning rate its last update
  used, η(s − 1) = lr·(s − 1)/10 (optax counts updates from 0); and an evaluation that takes 4 s
  (at step 10) is not in the next record's tokens_per_s (a bound with 2 s to spare for a loaded machine)."""
  import time

  from nlm_jax.training import trainer

  evaluate = trainer.Run.periodic_evaluation

  def slow_at_10(self, params, step):
    if step == 10:
      time.sleep(4.0)
    return evaluate(self, params, step)

  monkeypatch.setattr(trainer.Run, "periodic_evaluation", slow_at_10)
  train(*overrides(tmp_path / "r", corpus, steps=15, optim__warmup_steps=10))
  log = {r["step"]: r for r in metrics(tmp_path / "r")}
  assert sorted(log) == [5, 10, 15]
  for step in (5, 10):
    assert log[step]["lr"] == pytest.approx(3e-3 * (step - 1) / 10, rel=1e-5)
  assert log[15]["lr"] == pytest.approx(3e-3, rel=1e-5)
  assert 5 * 8 * 16 / log[15]["tokens_per_s"] < 2.0  # steps 11-15 (~0.1 s here), not the evaluation's 4 s


def test_plot_draws_each_curve_under_its_own_label_against_steps_and_tokens(interrupted, tmp_path, monkeypatch):
  """The figure's lines: in the steps column x = the records' steps, in the tokens column x = their
  tokens; the line labelled val_loss (eval_train_loss, train_loss) holds exactly those values."""
  import matplotlib
  from matplotlib.figure import Figure

  matplotlib.use("Agg")
  d, _, _, _ = interrupted
  figures, savefig = [], Figure.savefig
  monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figures.append(self), savefig(self, *a, **k))[1])
  code, out, err = run_cli("plot", "--workdir", d / "straight", "--output", tmp_path / "c.png")
  assert code == 0 and len(figures) == 1, err
  log = metrics(d / "straight")
  steps_ax, tokens_ax = figures[0].axes[0], figures[0].axes[1]  # the loss row
  for key in ("train_loss", "eval_train_loss", "val_loss"):
    records = [r for r in log if key in r]
    assert records
    for ax, x in ((steps_ax, "step"), (tokens_ax, "tokens")):
      (line,) = [ln for ln in ax.get_lines() if ln.get_label().split(" ")[0] == key]
      np.testing.assert_array_equal(line.get_xdata(), [r[x] for r in records])
      np.testing.assert_allclose(line.get_ydata(), [r[key] for r in records], rtol=1e-12)
