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
