"""Polyak averaging (optim.ema_decay): the state keeps the parameters' exponential moving average,
evaluation and the checkpoint readers use it, a fine-tuning's average starts at the pretrained
network, and an older checkpoint without the field still resumes."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from support import assert_trees_equal, final_state, run_cli, train, write_sentiment
from test_tasks import classify, pretrain


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
  monkeypatch.setenv("NLM_JAX_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def sst(tmp_path):
  return write_sentiment(tmp_path)


def test_ema_is_the_moving_average_of_the_parameters_and_what_is_evaluated(tmp_path, sst):
  from nlm_jax.config import load_config
  from nlm_jax.training import trainer

  beta, steps = 0.6, 4
  args = classify(tmp_path / "r", sst, steps=steps, optim__ema_decay=beta, optim__grad_accum=2,
                  train__checkpoint_every=1, train__keep_checkpoints=10, train__eval_every=steps, model__dropout=0.1)
  summary = train(*args)
  run = trainer.make_run(load_config(None, args))
  # the average starts at the initial parameters (the ones the trainer draws from the seed) ...
  ema = jax.tree.map(np.asarray, jax.device_get(run.task.init(jax.random.key_data(jax.random.key(2))).params))
  for t in range(1, steps + 1):  # ... and moves once per optimizer step (2 micro-batches each)
    params = final_state(tmp_path / "r", t)["params"]
    d = np.float32(min(beta, (1 + t) / (10 + t)))
    ema = jax.tree.map(lambda a, p: a + (np.float32(1) - d) * (p - a), ema, params)
  state = final_state(tmp_path / "r", steps)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), state["ema"], ema)
  assert not np.allclose(state["ema"]["head"]["kernel"], state["params"]["head"]["kernel"])
  # evaluation (in training, and `nlm-jax eval` from the checkpoint) scores the average
  code, out, err = run_cli("eval", "--workdir", tmp_path / "r", "--json")
  assert code == 0, err
  assert json.loads(out)["loss"] == summary["final_validation_loss"]
  loss = lambda p: run.evaluate(jax.tree.map(jax.numpy.asarray, p), "validation", None)["loss"]
  assert loss(state["ema"]) == pytest.approx(summary["final_validation_loss"], rel=1e-6)
  assert loss(state["params"]) != pytest.approx(summary["final_validation_loss"], rel=1e-6)


def test_ema_of_a_frozen_pretrained_body_is_the_pretrained_network(tmp_path, sst):
  pretrain(tmp_path / "pre", sst)
  train(*classify(tmp_path / "ft", sst, steps=4, train__init_from=tmp_path / "pre", finetune__freeze_body_steps=3,
                  optim__ema_decay=0.9, train__checkpoint_every=1, train__keep_checkpoints=10, train__eval_every=4))
  pretrained = final_state(tmp_path / "pre")["params"]
  for step in (1, 3):
    assert_trees_equal(final_state(tmp_path / "ft", step)["ema"]["body"], pretrained)
  moved = final_state(tmp_path / "ft", 4)["ema"]["body"]
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(pretrained)))


def test_a_checkpoint_without_the_ema_field_resumes(tmp_path, sst, monkeypatch):
  """Runs saved before TrainState had `ema` resume bitwise (the field restores as None)."""
  from nlm_jax.training.checkpoint import Checkpoints

  straight = train(*classify(tmp_path / "a", sst, steps=6, train__eval_every=3))
  save = Checkpoints.save

  def save_as_before(self, step, state, *args, **kwargs):  # the state as an older version wrote it
    return save(self, step, {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != "ema"},
                *args, **kwargs)

  with monkeypatch.context() as patch:
    patch.setattr(Checkpoints, "save", save_as_before)
    train(*classify(tmp_path / "b", sst, steps=6, train__eval_every=3, train__stop_after=3))
  meta = Checkpoints(str(tmp_path / "b"), read_only=True).manager.item_metadata(3)["state"]
  assert "ema" not in (meta.tree if hasattr(meta, "tree") else meta) and "params" in meta
  resumed = train(*classify(tmp_path / "b", sst, steps=6, train__eval_every=3))
  assert resumed["final_validation_loss"] == straight["final_validation_loss"]
  assert_trees_equal(final_state(tmp_path / "a")["params"], final_state(tmp_path / "b")["params"])
