"""Tasks through the one trainer: classification end to end, pretrain → fine-tune (the body starts
as the pretrained network, freezing, per-group learning rates), exact resume, the errors, word
dropout and Polyak averaging (optim.ema_decay); and the language-modelling path unchanged by the
task interface."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
import types

import conftest
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from support import assert_trees_equal, final_state, metrics, run_cli, train, write_sentiment


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
  monkeypatch.setenv("NLM_JAX_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def sst(tmp_path):
  return write_sentiment(tmp_path)


BODIES = {
    "lstm": ["model.arch=lstm", "model.d_embed=16", "model.d_hidden=16", "model.n_layers=2"],
    "transformer": ["model.arch=transformer", "model.d_model=16", "model.n_heads=2", "model.n_layers=2",
                    "model.context=32", "model.scan_layers=false"],
    "fnn": ["model.arch=fnn", "model.context=3", "model.d_embed=8", "model.d_hidden=16"],
}


def classify(workdir, sst, arch="lstm", steps=40, **extra) -> list[str]:
  out = [f"workdir={workdir}", "task.kind=classify", f"data.files.train={sst['train']}",
         f"data.files.validation={sst['dev']}", "tokenizer.kind=word", "data.batch_size=16", "task.max_len=32",
         f"train.steps={steps}", "train.eval_every=20", "train.log_every=10", "train.progress=false",
         "optim.lr=1e-2", "seed=2", *BODIES[arch]]
  return out + [f"{k.replace('__', '.')}={v}" for k, v in extra.items()]


def pretrain(workdir, sst, arch="lstm", steps=10, **extra) -> None:
  extra = {"data.file": sst["lm"], **{k.replace("__", "."): v for k, v in extra.items()}}
  train(f"workdir={workdir}", "tokenizer.kind=word", "data.batch_size=8",
        "data.seq_len=16", f"train.steps={steps}", f"train.eval_every={steps}", "train.progress=false",
        "seed=1", *BODIES[arch], *[f"{k}={v}" for k, v in extra.items()])


def lm_body(params: dict) -> dict:
  """A language model's parameters as a classifier's body holds them: without the output layer."""
  assert "out" in params  # the LSTM language models of these tests have one
  return {k: v for k, v in params.items() if k != "out"}


@pytest.mark.parametrize("arch,pooling", [("lstm", "last"),  # the other bodies: slow (the suite keeps ~10 min)
                                          pytest.param("transformer", "last", marks=pytest.mark.slow),
                                          pytest.param("fnn", "mean", marks=pytest.mark.slow)])
def test_classify_end_to_end_through_the_cli(tmp_path, sst, arch, pooling):
  summary = train(*classify(tmp_path / "r", sst, arch, steps=100, task__pooling=pooling))
  # The label is the one sentiment word: learnable in a few dozen steps by every body.
  assert summary["final_validation_accuracy"] >= 0.9, summary
  assert summary["examples_seen"] == 100 * 16
  per_class = summary["final_validation_per_class"]
  assert sum(c["examples"] for c in per_class.values()) == summary["final_validation_examples"] == 100
  assert sum(c["correct"] for c in per_class.values()) == round(100 * summary["final_validation_accuracy"])
  assert "val_accuracy" in metrics(tmp_path / "r")[-1]

  code, out, err = run_cli("eval", "--workdir", tmp_path / "r", "--json")
  assert code == 0, err
  result = json.loads(out)
  assert result["accuracy"] == summary["final_validation_accuracy"] and result["examples"] == 100

  code, out, err = run_cli("predict", "--workdir", tmp_path / "r", "--text", "the film was superb",
                           "--text", "a terrible plot", "--json")
  assert code == 0, err
  predictions = [json.loads(line) for line in out.splitlines()]
  assert [p["label"] for p in predictions] == ["1", "0"]
  for p in predictions:
    assert p["probability"] == max(p["probabilities"].values()) > 0.5
    assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_finetune_body_starts_pretrained_and_a_frozen_body_stays_bit_identical(tmp_path, sst):
  pretrain(tmp_path / "pre", sst)
  train(*classify(tmp_path / "ft", sst, steps=5, train__init_from=tmp_path / "pre", finetune__freeze_body_steps=3,
                  train__checkpoint_every=1, train__keep_checkpoints=10, train__eval_every=5,
                  model__dropout=0.1))
  pretrained = lm_body(final_state(tmp_path / "pre")["params"])
  states = {step: final_state(tmp_path / "ft", step)["params"] for step in (1, 3, 4)}
  # Three optimizer steps later the body is still exactly the pretrained network ...
  for step in (1, 3):
    assert_trees_equal(states[step]["body"], pretrained)
  # ... while the new head learned, and the body moves once it is unfrozen.
  assert not np.array_equal(states[1]["head"]["kernel"], states[3]["head"]["kernel"])
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(states[4]["body"]), jax.tree.leaves(pretrained))]
  assert any(moved)


def test_finetune_reinit_keeps_the_named_groups_as_initialized(tmp_path, sst):
  """finetune.reinit=[embed]: the embeddings are this run's own initialization (its seed's), every
  other body group the pretrained network's; a group the body lacks,
  or reinit without init_from, is a one-line error."""
  from test_errors import expect_error
  from nlm_jax.training import trainer

  pretrain(tmp_path / "pre", sst)
  frozen = dict(steps=2, finetune__freeze_body_steps=2, train__checkpoint_every=1, train__keep_checkpoints=10,
                train__eval_every=2)
  train(*classify(tmp_path / "ft", sst, train__init_from=tmp_path / "pre", finetune__reinit="[embed]", **frozen))
  pretrained = lm_body(final_state(tmp_path / "pre")["params"])
  body = final_state(tmp_path / "ft", 1)["params"]["body"]
  run, _, _ = trainer.load_run(tmp_path / "ft")  # the run's own initialization, as train() draws it
  initial = run.task.init(jax.random.key_data(jax.random.key(2))).params["body"]
  assert_trees_equal(body["embed"], jax.device_get(initial["embed"]))
  assert not np.array_equal(body["embed"]["embedding"], pretrained["embed"]["embedding"])
  assert set(body) == set(pretrained) and len(body) > 1
  for group in set(body) - {"embed"}:
    assert_trees_equal(body[group], pretrained[group])
  expect_error("train", *classify(tmp_path / "a", sst, train__init_from=tmp_path / "pre",
                                  finetune__reinit="[embedding]"),
               must_mention="finetune.reinit: 'embedding' is not a parameter group of the pretrained body")
  expect_error("train", *classify(tmp_path / "b", sst, finetune__reinit="[embed]"), must_mention="finetune.reinit")
  for name in "ab":  # refused before anything was written (the lock file aside)
    assert not (tmp_path / name).exists() or set(p.name for p in (tmp_path / name).iterdir()) == {".lock"}


def test_finetune_from_a_mismatched_run_is_one_line_error(tmp_path, sst):
  from test_errors import expect_error

  pretrain(tmp_path / "pre", sst)
  expect_error("train", *classify(tmp_path / "a", sst, train__init_from=tmp_path / "pre", model__d_hidden=32),
               must_mention="model.d_hidden: 16 (pretrained) vs 32 (now)")
  expect_error("train", *classify(tmp_path / "b", sst, train__init_from=tmp_path / "pre", tokenizer__min_count=2),
               must_mention="tokenizer.min_count")
  expect_error("train", *classify(tmp_path / "c", sst, "transformer", train__init_from=tmp_path / "pre"),
               must_mention="model.arch")
  train(*classify(tmp_path / "d", sst, steps=2))
  expect_error("train", *classify(tmp_path / "e", sst, train__init_from=tmp_path / "d"),
               must_mention="task.kind=classify run")
  for name in "abce":  # refused before anything was written (the lock file aside)
    assert not (tmp_path / name).exists() or set(p.name for p in (tmp_path / name).iterdir()) == {".lock"}


def test_finetune_resume_is_bitwise_exact(tmp_path, sst):
  pretrain(tmp_path / "pre", sst)
  extra = dict(model__dropout=0.1, task__head_dropout=0.2, task__word_dropout=0.2, task__label_smoothing=0.1,
               optim__ema_decay=0.9, train__eval_every=3,
               steps=6, train__init_from=tmp_path / "pre", finetune__freeze_body_steps=2,
               finetune__body_lr_scale=0.3)
  straight = train(*classify(tmp_path / "a", sst, **extra))
  train(*classify(tmp_path / "b", sst, **extra, train__stop_after=3))
  resumed = train(*classify(tmp_path / "b", sst, **extra))
  assert resumed["final_validation_loss"] == straight["final_validation_loss"]
  assert_trees_equal(final_state(tmp_path / "a"), final_state(tmp_path / "b"))


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
  pretrained = lm_body(final_state(tmp_path / "pre")["params"])
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


@pytest.mark.parametrize("arch,extra", [("lstm", dict(task__backward="true")),  # the Transformer's: slow (suite time)
                                        pytest.param("transformer", dict(model__tie_embeddings="false"),
                                                     marks=pytest.mark.slow)])
def test_a_classifier_checkpoint_with_the_lm_output_layer_resumes(tmp_path, sst, monkeypatch, arch, extra):
  """Classifiers kept their bodies' (unused) next-token output layers until 2026-11-27: such a run
  (an LSTM read both ways, whose forward body is a one-way classifier's; a Transformer with its own
  output layer) resumes bitwise without them, and evaluates; any other extra parameter is still a
  mismatch."""
  from nlm_jax.config import load_config
  from nlm_jax.errors import UserError
  from nlm_jax.models.recurrent import RecurrentLM
  from nlm_jax.models.transformer import Transformer
  from nlm_jax.training import trainer
  from nlm_jax.training.checkpoint import Checkpoints

  extra = dict(arch=arch, steps=6, train__eval_every=3, optim__ema_decay=0.9, model__dropout=0.1, **extra)
  bodies = ["body", "body_backward"] if "task__backward" in extra else ["body"]
  straight = train(*classify(tmp_path / "a", sst, **extra))
  assert not any("out" in final_state(tmp_path / "a")["params"][b] for b in bodies)
  model = Transformer if arch == "transformer" else RecurrentLM
  call = model.__call__
  with monkeypatch.context() as patch:  # the body as classifiers had it: with the output layer
    patch.setattr(model, "__call__", lambda self, *a, logits=True, **k: call(self, *a, logits=True, **k))
    train(*classify(tmp_path / "b", sst, **extra, train__stop_after=3))
  old = final_state(tmp_path / "b", 3)
  assert all("out" in old["params"][b] and "out" in old["ema"][b] for b in bodies)

  code, out, err = run_cli("eval", "--workdir", tmp_path / "b", "--json")
  assert code == 0, err
  logged = next(m for m in metrics(tmp_path / "b") if m.get("step") == 3 and "val_loss" in m)
  assert json.loads(out)["loss"] == pytest.approx(logged["val_loss"], rel=1e-6)

  run = trainer.make_run(load_config(None, classify(tmp_path / "b", sst, **extra)))
  ckpts = Checkpoints(str(tmp_path / "b"), read_only=True)
  with pytest.raises(UserError, match="does not match this run's model"):  # not retired: refused
    ckpts.restore(3, run.task.abstract_state, retired=lambda names: False)
  ckpts.close()

  resumed = train(*classify(tmp_path / "b", sst, **extra))
  assert resumed["final_validation_loss"] == straight["final_validation_loss"]
  new = final_state(tmp_path / "b")
  assert not any("out" in new["params"][b] for b in bodies)
  assert_trees_equal(final_state(tmp_path / "a")["params"], new["params"])
  assert_trees_equal(final_state(tmp_path / "a")["ema"], new["ema"])


def test_eval_of_several_classifiers_is_their_averaged_probabilities(tmp_path, sst):
  """`nlm-jax eval --workdir A --workdir B`: soft voting, each dev example's class probabilities
  averaged over the runs (each with its own tokenizer), scored as one model; the members' scores
  are their own `eval`'s; runs that cannot form one ensemble are a one-line error."""
  from test_errors import expect_error
  from nlm_jax.tasks.classify import read_tsv
  from nlm_jax.training import trainer

  train(*classify(tmp_path / "a", sst, steps=20))
  train(*classify(tmp_path / "b", sst, steps=20, seed=5, tokenizer__vocab_size=12, task__pooling="mean"))
  code, out, err = run_cli("eval", "--workdir", tmp_path / "a", "--workdir", tmp_path / "b", "--json")
  assert code == 0, err
  result = json.loads(out)
  texts, labels = read_tsv(sst["dev"], "sentence", "label")
  probs = []
  for name, member in zip("ab", result["members"]):
    code, out, err = run_cli("eval", "--workdir", tmp_path / name, "--json")
    alone = json.loads(out)
    assert member["accuracy"] == alone["accuracy"] and member["loss"] == pytest.approx(alone["loss"], rel=1e-5)
    run, params, _ = trainer.load_run(tmp_path / name)
    probs.append(run.predict(params, texts))
  assert result["members"][0]["accuracy"] != result["members"][1]["accuracy"]  # two different models
  mean = (probs[0] + probs[1]) / 2
  y = np.asarray([run.labels.index(label) for label in labels])
  assert result["runs"] == 2 and result["examples"] == len(texts) == 100
  assert result["accuracy"] == np.mean(mean.argmax(1) == y)
  assert result["loss"] == pytest.approx(-np.log(mean[np.arange(len(y)), y]).mean(), rel=1e-5)
  assert sum(c["correct"] for c in result["per_class"].values()) == round(100 * result["accuracy"])

  other = tmp_path / "other"
  os.makedirs(other)
  with open(sst["dev"]) as f:
    lines = f.read().splitlines()
  with open(other / "dev.tsv", "w") as f:  # one dev sentence changed
    f.write("\n".join(lines[:1] + ["a new film\t1"] + lines[2:]) + "\n")
  for split in ("train", "dev"):  # other class names
    with open(sst[split]) as f:
      (other / f"{split}_np.tsv").write_text(f.read().replace("\t0\n", "\tneg\n").replace("\t1\n", "\tpos\n"))
  train(*classify(tmp_path / "c", sst, steps=2, data__files__validation=other / "dev.tsv"))
  train(*classify(tmp_path / "d", sst, steps=2, data__files__train=other / "train_np.tsv",
                  data__files__validation=other / "dev_np.tsv"))
  pretrain(tmp_path / "lm", sst, steps=2)
  for name, message in (("c", "reads another 'validation' split"), ("d", "has the classes"),
                        ("lm", "an ensemble needs classification runs")):
    expect_error("eval", "--workdir", tmp_path / "a", "--workdir", tmp_path / name, must_mention=message)


def test_init_seed_fixes_the_network_and_leaves_dropout_and_data_order_to_seed(tmp_path, sst):
  """init_seed=7: the initial network (here, unchanged by one step at a warm-up's zero rate) is seed
  7's whatever the seed, and the run's key (dropout) stays its seed's."""
  runs = {"a": dict(seed=2, init_seed=7), "b": dict(seed=5, init_seed=7), "c": dict(seed=7), "d": dict(seed=2)}
  states = {}
  for name, extra in runs.items():
    train(*classify(tmp_path / name, sst, steps=1, optim__warmup_steps=5, model__dropout=0.1, **extra))
    states[name] = final_state(tmp_path / name)
  assert_trees_equal(states["a"]["params"], states["c"]["params"])
  assert_trees_equal(states["b"]["params"], states["c"]["params"])
  assert not np.array_equal(states["d"]["params"]["head"]["kernel"], states["c"]["params"]["head"]["kernel"])
  np.testing.assert_array_equal(states["a"]["key"], states["d"]["key"])
  assert not np.array_equal(states["a"]["key"], states["c"]["key"])


def test_eval_soup_scores_the_runs_averaged_parameters_as_one_network(tmp_path, sst):
  """`nlm-jax eval --workdir A --workdir B --soup`: the network whose parameters are the runs'
  mean, scored as `eval` scores a run, beside each run's own score; a run souped with itself is
  itself; runs that are not one network are a one-line error naming the difference."""
  from test_errors import expect_error
  from nlm_jax.training import trainer

  train(*classify(tmp_path / "a", sst, steps=20, init_seed=3))
  train(*classify(tmp_path / "b", sst, steps=20, seed=5, init_seed=3))
  code, out, err = run_cli("eval", "--workdir", tmp_path / "a", "--workdir", tmp_path / "b", "--soup", "--json")
  assert code == 0, err
  result = json.loads(out)
  run, a, _ = trainer.load_run(tmp_path / "a")
  _, b, _ = trainer.load_run(tmp_path / "b")
  mean = jax.tree.map(lambda x, y: (np.asarray(x, np.float64) + np.asarray(y, np.float64)) / 2, a, b)
  assert not np.allclose(mean["head"]["kernel"], np.asarray(a["head"]["kernel"]), atol=1e-4)  # two networks
  texts, labels = run.raw("validation")
  p = run.predict(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), mean), texts)
  y = np.asarray([run.labels.index(label) for label in labels])
  assert result["runs"] == 2 and result["examples"] == len(texts) == 100
  assert result["accuracy"] == np.mean(p.argmax(1) == y)
  assert result["loss"] == pytest.approx(-np.log(p[np.arange(len(y)), y]).mean(), rel=1e-5)
  for name, member in zip("ab", result["members"]):
    code, out, err = run_cli("eval", "--workdir", tmp_path / name, "--json")
    alone = json.loads(out)
    assert member["accuracy"] == alone["accuracy"] and member["loss"] == pytest.approx(alone["loss"], rel=1e-6)

  code, out, err = run_cli("eval", "--workdir", tmp_path / "a", "--workdir", tmp_path / "a", "--soup", "--json")
  itself = {k: v for k, v in json.loads(out).items() if k not in ("runs", "members")}
  code, out, err = run_cli("eval", "--workdir", tmp_path / "a", "--json")
  alone = json.loads(out)
  assert alone.pop("step") == 20 and itself == alone

  train(*classify(tmp_path / "vocab", sst, steps=2, tokenizer__vocab_size=12))
  train(*classify(tmp_path / "mean", sst, steps=2, task__pooling="mean"))
  train(*classify(tmp_path / "wide", sst, steps=2, model__d_hidden=8))
  pretrain(tmp_path / "lm", sst, steps=2)
  for name, message in (("vocab", "another tokenizer"), ("mean", "task.pooling: 'last' vs 'mean'"),
                        ("wide", "model.d_hidden: 16 vs 8"), ("lm", "task.kind: 'classify' vs 'lm'")):
    expect_error("eval", "--workdir", tmp_path / "a", "--workdir", tmp_path / name, "--soup", must_mention=message)
  expect_error("eval", "--workdir", tmp_path / "a", "--soup", must_mention="at least two runs")


def test_distillation_kl_matches_numpy():
  """T² · KL(q ‖ softmax(z / T)) per example, weighted, summed; zero where the model is the teacher."""
  from nlm_jax.objectives import distillation_kl

  rng = np.random.default_rng(1)
  logits = rng.normal(size=(5, 3)).astype(np.float32) * 2
  q = rng.dirichlet(np.ones(3), size=5).astype(np.float32)
  q[1] = [0.0, 0.25, 0.75]  # a zero target probability adds nothing (0 · log 0 = 0)
  weights = np.array([1, 1, 0, 1, 0.5], np.float32)
  for T in (1.0, 2.5):
    z = logits / T - (logits / T).max(1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    kl = (q * (np.log(np.where(q > 0, q, 1.0)) - log_p)).sum(1)
    total, count = distillation_kl(jnp.asarray(logits), jnp.asarray(q), T, jnp.asarray(weights))
    np.testing.assert_allclose(float(total), T**2 * (weights * kl).sum(), rtol=1e-5)
    assert float(count) == 3.5
  p = jax.nn.softmax(jnp.asarray(logits) / 2.0)
  np.testing.assert_allclose(float(distillation_kl(jnp.asarray(logits), p, 2.0)[0]), 0.0, atol=1e-5)


def test_distillation_from_teachers_trains_on_their_averaged_softened_probabilities(tmp_path, sst):
  """task.teachers: the soft targets are the teachers' probabilities on the training split, each
  p^(1/T) renormalized, then averaged (NumPy here, from each teacher's own predictions); a training
  batch carries its examples' targets, its loss is (1 − α)·NLL + α·T²·KL and the log splits it
  (train_class_loss, train_distill_kl); α = 0 trains bitwise the run without teachers; a resume
  whose teachers changed is refused, naming them; a teacher that cannot teach is a one-line error."""
  from test_errors import expect_error
  from nlm_jax.config import load_config
  from nlm_jax.objectives import classification_nll, distillation_kl
  from nlm_jax.tasks.classify import MASK, TRANSFER, mask_copies
  from nlm_jax.training import trainer

  for name, seed in (("a", 5), ("b", 6)):
    train(*classify(tmp_path / name, sst, steps=20, seed=seed))
  alpha, T = 0.7, 2.0
  teachers = f"[{tmp_path / 'a'},{tmp_path / 'b'}]"
  args = classify(tmp_path / "s", sst, steps=6, train__eval_every=3, task__teachers=teachers,
                  task__distill_weight=alpha, task__distill_temperature=T)
  run = trainer.make_run(load_config(None, args))
  texts, labels = run.raw("train")

  def targets(texts):  # NumPy: the teachers' probabilities of the texts at T, averaged
    out = 0.0
    for name in "ab":
      teacher, params, _ = trainer.load_run(tmp_path / name)
      p = teacher.predict(params, texts).astype(np.float64)
      out = out + p ** (1 / T) / (p ** (1 / T)).sum(1, keepdims=True) / 2
    return out

  expected = targets(texts)
  soft = run.soft_targets()
  assert soft.shape == (len(texts), 2) and not np.allclose(soft, np.round(soft), atol=0.05)
  np.testing.assert_allclose(soft, expected, rtol=2e-5)

  indices = [7, 3, 250, 0, 41]
  batch = run.collate(indices, "train", 8)  # the training iterator's batches are collate's
  assert (batch["soft"][:5] == soft[indices]).all() and not batch["soft"][5:].any()
  assert not run.collate([0, 1], "validation", 2)["soft"].any()  # evaluation reads the labels only

  def objective(run, batch):  # the step's loss; NumPy-side: the NLL of the labelled rows, the KL of all
    params = run.task.init(jax.random.key_data(jax.random.key(3))).params
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    loss_sum, count, _, extra = run.task._objective(params, b, None, None, deterministic=True)
    logits = run.task._logits(params, b, None, deterministic=True)
    nll = float(classification_nll(logits, b["labels"], b["labelled"])[0])
    return loss_sum, count, extra, nll, float(distillation_kl(logits, b["soft"], T, b["weights"])[0])

  assert (batch["labelled"] == batch["weights"]).all()
  loss_sum, count, extra, nll, kl = objective(run, batch)
  assert kl > 0.01
  np.testing.assert_allclose(float(loss_sum), (1 - alpha) * nll + alpha * kl, rtol=1e-5)

  train(*args)
  record = metrics(tmp_path / "s")[0]
  np.testing.assert_allclose((1 - alpha) * record["train_class_loss"] + alpha * record["train_distill_kl"],
                             record["train_loss"], rtol=1e-5)
  plain = train(*classify(tmp_path / "plain", sst, steps=6, train__eval_every=3))
  zero = train(*classify(tmp_path / "zero", sst, steps=6, train__eval_every=3, task__teachers=teachers,
                         task__distill_weight=0))
  assert zero["final_validation_loss"] == plain["final_validation_loss"]
  assert_trees_equal(final_state(tmp_path / "zero")["params"], final_state(tmp_path / "plain")["params"])

  # A transfer set (task.transfer_copies): masked copies of the training texts, taught by the teachers alone
  copies = mask_copies(texts, 2, 0.25, seed=7)  # the student's seed below
  assert len(copies) == 2 * len(texts) and copies == mask_copies(texts, 2, 0.25, 7) != mask_copies(texts, 2, 0.25, 3)
  for text, copy in zip(texts * 2, copies):  # copy-major: every text's first copy, then every second one
    words, read = text.split(), copy.split()
    assert len(read) == len(words) and MASK in read and all(r in (w, MASK) for w, r in zip(words, read))
  assert all(c.split().count(MASK) == 1 for c in mask_copies(texts, 1, 0.0, 2))  # one word at least, at rate 0
  share = sum(c.split().count(MASK) for c in copies) / sum(len(c.split()) for c in copies)
  assert 0.25 < share < 0.4  # each word at 0.25, and one per copy besides
  args = classify(tmp_path / "t", sst, steps=6, train__eval_every=3, task__teachers=teachers,
                  task__distill_weight=alpha, task__distill_temperature=T, task__transfer_copies=2,
                  task__transfer_mask=0.25, seed=7)
  run = trainer.make_run(load_config(None, args))
  assert run.train_source() == TRANSFER and run.transfer_texts() == copies
  soft = run.soft_targets()
  np.testing.assert_allclose(soft, np.concatenate([expected, targets(copies)]), rtol=2e-5)
  n, unk = len(texts), run.tokenizer.unk_id
  indices = [5, n + 5, 2 * n + 9, 1]
  batch = run.collate(indices, TRANSFER, 6)
  assert batch["labelled"].tolist() == [1, 0, 0, 1, 0, 0] and batch["weights"].tolist() == [1, 1, 1, 1, 0, 0]
  assert (batch["soft"][:4] == soft[indices]).all() and not batch["soft"][4:].any()
  unks = ((batch["inputs"] == unk) & (batch["mask"] > 0)).sum(1)  # <unk> is also the padding's id
  assert unks[1] == copies[5].split().count(MASK) > unks[0]
  assert run.collate(indices[:1], "train", 2)["labelled"].tolist() == [1, 0]
  loss_sum, count, extra, nll, kl = objective(run, batch)
  assert float(count) == 4 and float(extra["labelled"]) == 2
  np.testing.assert_allclose(float(loss_sum), (1 - alpha) * nll + alpha * kl, rtol=1e-5)
  logged = run.task.train_scores([{"count": count, **extra}])  # accuracy and NLL: of the labelled texts
  np.testing.assert_allclose([logged["train_accuracy"], logged["train_class_loss"], logged["train_distill_kl"]],
                             [float(extra["correct"]) / 2, nll / 2, kl / 4], rtol=1e-5)
  straight = train(*args)  # and a resume on the transfer set is exact
  args = [f"workdir={tmp_path / 't2'}"] + args[1:]  # classify's first is the workdir
  train(*args, "train.stop_after=3")
  resumed = train(*args)
  assert resumed["final_validation_loss"] == straight["final_validation_loss"]
  assert_trees_equal(final_state(tmp_path / "t"), final_state(tmp_path / "t2"))

  train(*classify(tmp_path / "r", sst, steps=6, train__eval_every=3, task__teachers=teachers, train__stop_after=3))
  train(*classify(tmp_path / "b", sst, steps=21, seed=6))  # teacher b trains on: other targets
  expect_error("train", *classify(tmp_path / "r", sst, steps=6, train__eval_every=3, task__teachers=teachers),
               must_mention="the teachers' soft targets (task.teachers) changed")
  pretrain(tmp_path / "lm", sst, steps=2)
  (tmp_path / "other").mkdir()
  other = write_sentiment(tmp_path / "other", n_train=300)
  train(*classify(tmp_path / "o", other, steps=2))
  train(*classify(tmp_path / "bytes", sst, steps=2, tokenizer__kind="byte"))
  for teacher, message in ((tmp_path / "lm", "is a task.kind=lm run"), (tmp_path / "o", "another 'train' split"),
                           (tmp_path / "none", "no nlm-jax run"), (tmp_path / "x", "its own teacher")):
    expect_error("train", *classify(tmp_path / "x", sst, task__teachers=f"[{teacher}]"), must_mention=message)
  for extra, message in ((dict(task__distill_weight=0.3), "task.distill_weight is for distillation"),
                         (dict(task__teachers=teachers, task__distill_weight=1.5), "task.distill_weight=1.5"),
                         (dict(task__transfer_copies=1), "task.transfer_copies is for distillation"),
                         (dict(task__teachers=teachers, task__transfer_mask=0.3), "task.transfer_mask is for"),
                         (dict(task__teachers=teachers, task__transfer_copies=1, tokenizer__kind="byte"),
                          "needs tokenizer.kind=word"),
                         (dict(task__teachers=f"[{tmp_path / 'bytes'}]", task__transfer_copies=1),
                          "reads text with a byte tokenizer")):
    expect_error("train", *classify(tmp_path / "x", sst, **extra), must_mention=message)
  assert not (tmp_path / "x").exists() or set(p.name for p in (tmp_path / "x").iterdir()) == {".lock"}


@pytest.mark.parametrize("arch,backward", [("lstm", False), ("lstm", True), ("transformer", False)])
def test_lm_weight_adds_each_text_s_mean_next_token_nll_of_its_own_words(tmp_path, sst, arch, backward):
  """finetune.lm_weight = λ (GPT-1's auxiliary objective): the training loss is the classification
  NLL + λ × each text's mean next-token NLL under the body (and the backward body, over the text
  reversed), computed here in NumPy; the words predicted are the text's own, not word dropout's
  <unk>s; the bodies keep their output layers only then."""
  from nlm_jax import models
  from nlm_jax.config import load_config
  from nlm_jax.objectives import classification_nll
  from nlm_jax.tasks.classify import drop_words
  from nlm_jax.training import trainer

  lam = 0.7
  args = classify(tmp_path / "r", sst, arch, task__word_dropout=0.5, task__backward=str(backward).lower(),
                  finetune__lm_weight=lam)
  run = trainer.make_run(load_config(None, args))
  plain = trainer.make_run(load_config(None, classify(tmp_path / "p", sst, arch)))
  params = jax.device_get(run.task.init(jax.random.key_data(jax.random.key(3))).params)
  params = jax.tree.map(lambda x: 5 * x, params)  # peaked next-token distributions: a misread word shows
  plain_body = plain.task.init(jax.random.key_data(jax.random.key(3))).params["body"]
  assert set(params["body"]) - set(plain_body) == ({"out"} if arch == "lstm" else set())  # the Transformer's is tied
  batch = {k: jnp.asarray(v) for k, v in run.collate(list(range(6)), "train", 8).items()}
  key = jax.random.key(11)
  loss_sum, count, _, extra = jax.jit(lambda p, b, k: run.task._objective(p, b, None, k, deterministic=False))(
      params, batch, key)

  _, word_key = jax.random.split(key)  # the inputs the network read in that step
  t = run.task
  read = np.asarray(drop_words(word_key, batch["inputs"], batch["mask"], 0.5, t.unk_id, t.keep_ids))
  tokens, mask, weights = (np.asarray(batch[k]) for k in ("inputs", "mask", "weights"))
  assert (read != tokens).any()  # word dropout did act
  logits = run.model.apply({"params": params}, jnp.asarray(read), batch["mask"])
  expected_cls, expected_lm = float(classification_nll(logits, batch["labels"], batch["weights"])[0]), 0.0
  lm = models.build(run.model_cfg)
  for name in ("body", "body_backward") if backward else ("body",):
    body_lm = 0.0
    seen, words = read.copy(), tokens.copy()
    if name == "body_backward":
      for b, n in enumerate(mask.sum(1).astype(int)):
        seen[b, :n], words[b, :n] = read[b, n - 1::-1], tokens[b, n - 1::-1]
    logp = np.asarray(jax.nn.log_softmax(lm.apply({"params": params[name]}, jnp.asarray(seen)).logits), np.float64)
    for b, n in enumerate(mask.sum(1).astype(int)):
      if weights[b]:  # the batch's padding rows (one token, weight 0) add nothing
        body_lm += weights[b] * np.mean([-logp[b, i, words[b, i + 1]] for i in range(n - 1)])
    # the training log's parts of the loss (train_class_loss, train_lm_loss[_backward]) read these
    np.testing.assert_allclose(float(extra[f"{name}_lm_nll_sum"]), body_lm, rtol=1e-5)
    expected_lm += lam * body_lm
  assert float(count) == 6
  np.testing.assert_allclose(float(loss_sum) - expected_cls, expected_lm, rtol=1e-5)
  np.testing.assert_allclose(float(extra["class_nll_sum"]), expected_cls, rtol=1e-5)


@pytest.mark.parametrize("lm_weight", [0.0, 0.5])
def test_training_log_has_the_accuracy_and_the_loss_s_parts_of_the_batches_trained_on(tmp_path, sst, lm_weight):
  """metrics.jsonl's train_accuracy at step 2 is the accuracy of step 1's parameters (its
  checkpoint) over the two micro-batches of step 2 (optim.grad_accum=2: the third and fourth
  training batches); with finetune.lm_weight the log splits train_loss into train_class_loss +
  λ · train_lm_loss, and a plain run's log has no such keys."""
  from nlm_jax.config import load_config
  from nlm_jax.objectives import accuracy, classification_nll
  from nlm_jax.training import trainer

  args = classify(tmp_path / "r", sst, steps=2, optim__grad_accum=2, train__checkpoint_every=1,
                  train__keep_checkpoints=5, model__dropout=0, task__head_dropout=0, finetune__lm_weight=lm_weight)
  train(*args)
  record = metrics(tmp_path / "r")[1]
  assert record["step"] == 2
  run = trainer.make_run(load_config(None, args))
  batches = run.train_iterator()
  params = jax.tree.map(jnp.asarray, final_state(tmp_path / "r", step=1)["params"])
  correct = count = class_nll = 0.0
  for k in range(4):
    batch = {key: jnp.asarray(v) for key, v in next(batches).items()}
    if k >= 2:
      logits = run.task._logits(params, batch, None, deterministic=True)  # dropout 0: training's logits
      correct += float(accuracy(logits, batch["labels"], batch["weights"])[0])
      count += float(batch["weights"].sum())
      class_nll += float(classification_nll(logits, batch["labels"], batch["weights"])[0])
  assert 0 < correct < count  # an accuracy that tells the batches apart
  np.testing.assert_allclose(record["train_accuracy"], correct / count, rtol=1e-6)
  if lm_weight:
    np.testing.assert_allclose(record["train_class_loss"], class_nll / count, rtol=1e-5)
    np.testing.assert_allclose(record["train_class_loss"] + lm_weight * record["train_lm_loss"],
                               record["train_loss"], rtol=1e-5)
    assert record["train_lm_loss"] > 1.0  # a next-token NLL, not the classification's
  else:
    np.testing.assert_allclose(record["train_loss"], class_nll / count, rtol=1e-5)
    assert not {"train_class_loss", "train_lm_loss"} & set(record)


def test_lm_weight_fine_tuning_keeps_the_pretrained_output_layer_and_refuses_misuse(tmp_path, sst):
  from test_errors import expect_error

  pretrain(tmp_path / "pre", sst)
  train(*classify(tmp_path / "ft", sst, steps=2, train__init_from=tmp_path / "pre", finetune__lm_weight=0.5,
                  finetune__freeze_body_steps=2, train__checkpoint_every=1, train__keep_checkpoints=10,
                  train__eval_every=2))
  assert_trees_equal(final_state(tmp_path / "ft", 1)["params"]["body"], final_state(tmp_path / "pre")["params"])
  for extra, message in ((dict(finetune__lm_weight=-1), "finetune.lm_weight"),
                         (dict(finetune__lm_weight=0.5, task__prefix_lm="true", **{"model.arch": "transformer"}),
                          "needs a causal body")):
    expect_error("train", *classify(tmp_path / "x", sst, **extra), must_mention=message)
  expect_error("train", f"workdir={tmp_path / 'y'}", f"data.file={sst['lm']}", "finetune.lm_weight=0.5",
               must_mention="finetune.lm_weight is for task.kind=classify")
  assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_classification_loss_matches_numpy():
  from nlm_jax.objectives import classification_nll

  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 4)).astype(np.float32) * 3
  labels = rng.integers(0, 4, size=6)
  weights = np.array([1, 1, 0, 1, 1, 0], np.float32)
  for eps in (0.0, 0.1):
    log_p = logits - logits.max(1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
    target = (1 - eps) * np.eye(4)[labels] + eps / 4
    expected = -(weights[:, None] * target * log_p).sum()
    loss_sum, count = classification_nll(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights), eps)
    np.testing.assert_allclose(float(loss_sum), expected, rtol=1e-5)
    assert float(count) == 4.0


def test_pooling_reads_the_last_real_token_and_ignores_padding():
  from nlm_jax.models import LSTMConfig
  from nlm_jax.tasks.classify import Classifier

  cfg = LSTMConfig(vocab_size=11, d_embed=8, d_hidden=8, n_layers=1)
  tokens = jnp.asarray([[3, 4, 5, 0, 0, 0], [3, 4, 5, 7, 9, 2]], jnp.int32)
  mask = jnp.asarray([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], jnp.float32)
  for pooling in ("last", "mean", "max", "concat"):
    model = Classifier(cfg, 3, pooling)
    params = model.init(jax.random.key(0), tokens, mask)
    logits = model.apply(params, tokens, mask)
    alone = model.apply(params, tokens[:1, :3], mask[:1, :3])  # the first text without its padding
    np.testing.assert_allclose(np.asarray(logits[0]), np.asarray(alone[0]), rtol=1e-6, atol=1e-6)
    other = model.apply(params, tokens.at[0, 3:].set(8), mask)  # what the padding holds does not matter
    np.testing.assert_array_equal(np.asarray(other[0]), np.asarray(logits[0]))


def test_bidirectional_transformer_classifier_reads_the_whole_text_and_ignores_padding():
  import flax.linen as nn

  from nlm_jax import models
  from nlm_jax.models import TransformerConfig
  from nlm_jax.tasks.classify import Classifier, pool

  cfg = TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=2, context=8, scan_layers=False)
  tokens = jnp.asarray([[3, 4, 5, 0, 0, 0], [3, 4, 5, 7, 9, 2]], jnp.int32)
  mask = jnp.asarray([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], jnp.float32)
  model = Classifier(cfg, 3, "mean", bidirectional=True)
  variables = model.init(jax.random.key(0), tokens, mask)
  logits = model.apply(variables, tokens, mask)
  # what it computes: the body as a prefix LM whose prefix is each row's text, mean-pooled, the head
  params = nn.meta.unbox(variables)["params"]
  body = models.build(cfg)
  for prefix, differs in ((jnp.asarray([3, 6]), False), (None, True)):  # None: causal, another function
    h = body.apply({"params": params["body"]}, tokens, None, prefix_B=prefix).hidden
    want = pool(h, mask, "mean") @ params["head"]["kernel"] + params["head"]["bias"]
    close = np.allclose(np.asarray(logits), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert close != differs
  alone = model.apply(variables, tokens[:1, :3], mask[:1, :3])
  np.testing.assert_allclose(np.asarray(logits[0]), np.asarray(alone[0]), rtol=1e-5, atol=1e-6)
  other = model.apply(variables, tokens.at[0, 3:].set(8), mask)
  np.testing.assert_array_equal(np.asarray(other[0]), np.asarray(logits[0]))


def test_backward_classifier_reads_each_text_right_to_left_and_ignores_padding():
  """task.backward: the head reads [forward body's pooled states; backward body's pooled states
  over the text reversed], computed here apart from the module, the reversal in NumPy."""
  import flax.linen as nn

  from nlm_jax import models
  from nlm_jax.models import LSTMConfig
  from nlm_jax.tasks.classify import Classifier, pool

  cfg = LSTMConfig(vocab_size=11, d_embed=8, d_hidden=8, n_layers=2)
  tokens = np.asarray([[3, 4, 5, 6, 0, 0], [3, 4, 5, 7, 9, 2]], np.int32)
  mask = np.asarray([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], np.float32)
  reversed_ = tokens.copy()
  for b, n in enumerate(mask.sum(1).astype(int)):
    reversed_[b, :n] = tokens[b, n - 1::-1]
  for pooling in ("last", "concat"):
    model = Classifier(cfg, 3, pooling, backward=True)
    variables = model.init(jax.random.key(0), tokens, mask)
    params = nn.meta.unbox(variables)["params"]
    assert set(params) == {"body", "body_backward", "head"}
    logits = model.apply(variables, tokens, mask)
    body = models.build(cfg)
    features = [pool(body.apply({"params": params[name]}, jnp.asarray(x), logits=False).hidden, jnp.asarray(mask),
                     pooling) for name, x in (("body", tokens), ("body_backward", reversed_))]
    want = jnp.concatenate(features, -1) @ params["head"]["kernel"] + params["head"]["bias"]
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want), rtol=1e-5, atol=1e-6)
    alone = model.apply(variables, tokens[:1, :4], mask[:1, :4])  # the first text without its padding
    np.testing.assert_allclose(np.asarray(logits[0]), np.asarray(alone[0]), rtol=1e-5, atol=1e-6)
    other = model.apply(variables, np.where(mask > 0, tokens, 8), mask)  # what the padding holds: no matter
    np.testing.assert_array_equal(np.asarray(other[0]), np.asarray(logits[0]))


def test_a_backward_language_model_reads_each_split_reversed(tmp_path, sst):
  from nlm_jax.config import DataConfig, TokenizerConfig
  from nlm_jax.data.corpus import Corpus

  forward = Corpus(DataConfig(file=sst["lm"]), TokenizerConfig(kind="word"))
  backward = Corpus(DataConfig(file=sst["lm"], reverse=True), TokenizerConfig(kind="word"))
  assert backward.tokenizer.to_dict() == forward.tokenizer.to_dict()
  for split in ("train", "validation"):
    np.testing.assert_array_equal(backward.tokens(split), forward.tokens(split)[::-1])
    assert backward.tokens(split).flags["C_CONTIGUOUS"]


def test_finetune_backward_body_starts_as_the_backward_language_model(tmp_path, sst):
  """task.backward + init_from + init_backward_from: at step 1 of a frozen body, `body` is the
  forward language model and `body_backward` the backward one, exactly; finetune.reinit applies to
  both bodies; the mistakes are one-line errors, refused before anything is written."""
  from test_errors import expect_error

  pretrain(tmp_path / "fwd", sst)
  pretrain(tmp_path / "bwd", sst, data__reverse="true")
  both = dict(task__backward="true", train__init_from=tmp_path / "fwd", train__init_backward_from=tmp_path / "bwd",
              task__pooling="concat")
  frozen = dict(steps=2, finetune__freeze_body_steps=2, train__checkpoint_every=1, train__keep_checkpoints=10,
                train__eval_every=2)
  train(*classify(tmp_path / "ft", sst, **both, **frozen))
  params = final_state(tmp_path / "ft", 1)["params"]
  forward, backward = (lm_body(final_state(tmp_path / name)["params"]) for name in ("fwd", "bwd"))
  assert not np.array_equal(forward["embed"]["embedding"], backward["embed"]["embedding"])
  assert_trees_equal(params["body"], forward)
  assert_trees_equal(params["body_backward"], backward)
  assert params["head"]["kernel"].shape[0] == 2 * 3 * 16  # [forward; backward] × [last; mean; max] × H

  train(*classify(tmp_path / "re", sst, **both, **frozen, finetune__reinit="[embed]"))
  params = final_state(tmp_path / "re", 1)["params"]
  for name, pretrained in (("body", forward), ("body_backward", backward)):
    assert not np.array_equal(params[name]["embed"]["embedding"], pretrained["embed"]["embedding"])
    assert_trees_equal(params[name]["layer_1"], pretrained["layer_1"])

  pretrain(tmp_path / "other", sst, data__reverse="true", data__file=sst["train"])  # another text: other words
  mistakes = {
      "a": (dict(both, train__init_backward_from=tmp_path / "fwd"), "reads text left to right"),
      "b": (dict(both, train__init_from=tmp_path / "bwd"), "is a backward language model"),
      "c": (dict(both, train__init_backward_from=tmp_path / "other"), "another vocabulary"),
      "d": (dict(both, task__backward="false"), "needs task.backward=true"),
      "e": ({k: v for k, v in both.items() if k != "train__init_backward_from"}, "needs train.init_backward_from"),
      "f": (dict(data__reverse="true"), "data.reverse=true is for language models"),
  }
  for name, (extra, message) in mistakes.items():
    expect_error("train", *classify(tmp_path / name, sst, **extra), must_mention=message)
    assert not (tmp_path / name).exists() or set(p.name for p in (tmp_path / name).iterdir()) == {".lock"}
  expect_error("generate", "--workdir", tmp_path / "bwd", must_mention="backward language model")


def test_word_dropout_replaces_words_by_unk_at_its_rate():
  from nlm_jax.tasks.classify import drop_words

  B, unk, edge = 2000, 2, 1  # edge: the start / end marker
  tokens = np.tile(np.asarray([[edge, 5, 6, 7, 8, edge, 0, 0]], np.int32), (B, 1))
  mask = np.tile((np.arange(8) < 6).astype(np.float32)[None], (B, 1))
  out = np.asarray(drop_words(jax.random.key(0), jnp.asarray(tokens), jnp.asarray(mask), 0.3, unk, (edge,)))
  np.testing.assert_array_equal(out[:, [0, 5, 6, 7]], tokens[:, [0, 5, 6, 7]])  # markers, padding: kept
  words, words_out = tokens[:, 1:5], out[:, 1:5]
  assert np.all((words_out == words) | (words_out == unk))
  assert abs((words_out == unk).mean() - 0.3) < 0.03  # 8,000 draws: std 0.005
  again = drop_words(jax.random.key(0), jnp.asarray(tokens), jnp.asarray(mask), 0.3, unk, (edge,))
  np.testing.assert_array_equal(np.asarray(again), out)
  assert not np.array_equal(np.asarray(drop_words(jax.random.key(1), jnp.asarray(tokens), jnp.asarray(mask),
                                                  0.3, unk, (edge,))), out)


def test_word_dropout_acts_in_training_only(sst, tmp_path):
  from nlm_jax.config import load_config
  from nlm_jax.tasks.classify import ClassifyRun

  run = ClassifyRun(load_config(None, classify(tmp_path / "r", sst, task__word_dropout=0.999)))
  tok = run.tokenizer
  texts = ["the movie was good", "a film plot very dull"]
  ids = [np.asarray([tok.start_id, *tok.encode(t)], np.int32) for t in texts]
  rows = [np.pad(x, (0, 8 - len(x))) for x in ids]
  batch = {"inputs": jnp.asarray(np.stack(rows)), "mask": jnp.asarray(np.stack(
      [(np.arange(8) < len(x)).astype(np.float32) for x in ids]))}
  other = dict(batch, inputs=batch["inputs"].at[:, 1:3].set(tok.index["acting"]))  # other words, same lengths
  params = run.task.model.init(jax.random.key(0), batch["inputs"], batch["mask"])["params"]
  key = jax.random.key(3)
  # training: every word reads as <unk> (p = 0.999), so texts of the same length are the same text
  np.testing.assert_array_equal(np.asarray(run.task._logits(params, batch, key, False)),
                                np.asarray(run.task._logits(params, other, key, False)))
  # evaluation reads the words
  assert not np.allclose(np.asarray(run.task._logits(params, batch, None, True)),
                         np.asarray(run.task._logits(params, other, None, True)))


def test_word_dropout_needs_an_unknown_word_token(tmp_path, sst):
  code, _, err = run_cli("train", *classify(tmp_path / "r", sst, task__word_dropout=0.1, tokenizer__kind="char"))
  assert code != 0 and "task.word_dropout needs a tokenizer with an unknown-word token" in err
  assert len(err.strip().splitlines()) == 1


def test_tsv_lines_end_at_newlines_only_and_an_empty_label_is_an_error(tmp_path):
  from nlm_jax.errors import UserError
  from nlm_jax.tasks.classify import read_tsv

  path = tmp_path / "a.tsv"
  path.write_bytes("sentence\tlabel\r\nit was\u2028 fine\x0c here\t1\r\n\ndull\t0\n".encode())
  assert read_tsv(str(path), "sentence", "label") == (["it was\u2028 fine\x0c here", "dull"], ["1", "0"])
  path.write_text("sentence\tlabel\ngood\t1\nno label here\t\n")
  with pytest.raises(UserError, match="a.tsv:3: the label .* is empty"):
    read_tsv(str(path), "sentence", "label")


def test_a_transformer_with_a_context_under_eight_tokens_classifies(tmp_path, sst):
  """The network is initialized on an example of min(8, task.max_len) tokens: a Transformer whose
  context is shorter than 8 builds (it failed with a traceback)."""
  out = train(*classify(tmp_path / "r", sst, "transformer", steps=2, model__context=6, task__max_len=6))
  assert out["steps"] == 2


def test_prefix_lm_classification_needs_a_transformer(tmp_path, sst):
  code, _, err = run_cli("train", *classify(tmp_path / "r", sst, "lstm", task__prefix_lm="true"))
  assert code != 0 and "task.prefix_lm=true needs model.arch=transformer" in err
  code, _, err = run_cli("train", *classify(tmp_path / "c", sst, "transformer", task__prefix_lm="true",
                                            **{"model.attention": "cudnn", "model.dtype": "bfloat16",
                                               "train.deterministic": "false"}))
  assert code != 0 and "task.prefix_lm=true needs model.attention=auto or xla" in err


def test_pooling_against_numpy():
  from nlm_jax.tasks.classify import pool

  rng = np.random.default_rng(0)
  h = rng.normal(size=(3, 5, 4)).astype(np.float32)
  lengths = [2, 5, 1]
  mask = (np.arange(5)[None] < np.asarray(lengths)[:, None]).astype(np.float32)
  h[0, 2:] = 100.0  # padding larger than every real state: 'max' and 'mean' must not see it
  expected = {"last": np.stack([h[b, n - 1] for b, n in enumerate(lengths)]),
              "mean": np.stack([h[b, :n].mean(0) for b, n in enumerate(lengths)]),
              "max": np.stack([h[b, :n].max(0) for b, n in enumerate(lengths)])}
  expected["concat"] = np.concatenate([expected["last"], expected["mean"], expected["max"]], -1)
  for kind, want in expected.items():
    np.testing.assert_allclose(np.asarray(pool(jnp.asarray(h), jnp.asarray(mask), kind)), want, rtol=1e-6)
  with pytest.raises(ValueError, match="pooling 'sum'"):
    pool(jnp.asarray(h), jnp.asarray(mask), "sum")


def test_discriminative_learning_rates_per_layer():
  from nlm_jax import config as config_lib
  from nlm_jax.tasks import finetune
  from nlm_jax.tasks.classify import Classifier
  from nlm_jax.training import optim

  cfg = config_lib.load_config(None, ["workdir=x", "task.kind=classify", "model.arch=lstm", "model.n_layers=2",
                                      "model.d_embed=4", "model.d_hidden=4", "optim.name=sgd", "optim.lr=1.0",
                                      "finetune.body_lr_scale=0.5", "finetune.layer_lr_decay=2.0",
                                      "data.files.train=x"])
  model_cfg = config_lib.model_config(cfg, 7)
  params = Classifier(model_cfg, 2).init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))["params"]
  params = jax.tree.map(jnp.zeros_like, params)
  tx = optim.make_optimizer(cfg.optim, 10, finetune.lr_groups(cfg, model_cfg, head="head"))
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  rate = lambda tree: float(-np.unique(np.asarray(jax.tree.leaves(tree)[0]))[0])
  assert rate(updates["head"]) == 1.0
  assert "out" not in updates["body"]  # a classifier's body has no output layer (the top group: × 0.5)
  assert rate(updates["body"]["layer_1"]) == 0.25  # each layer below the top ÷ 2
  assert rate(updates["body"]["layer_0"]) == 0.125
  assert rate(updates["body"]["embed"]) == 0.0625


def test_discriminative_learning_rates_of_a_transformer_body():
  """finetune.body_lr_scale alone: every body parameter learns at lr × the scale, the head at lr;
  with finetune.layer_lr_decay (a Transformer classifier's body, SGD with lr 1 and unit gradients):
  the final norm (the top group) at the body's rate, each block below it ÷ the decay, and the
  learned positions at the embedding's rate (both the lowest layer)."""
  from nlm_jax import config as config_lib
  from nlm_jax.tasks import finetune
  from nlm_jax.tasks.classify import Classifier
  from nlm_jax.training import optim

  def updates(*extra):
    cfg = config_lib.load_config(None, ["workdir=x", "task.kind=classify", "model.arch=transformer",
                                        "model.n_layers=2", "model.d_model=8", "model.n_heads=2", "model.context=8",
                                        "model.scan_layers=false", "optim.name=sgd", "optim.lr=1.0",
                                        "finetune.body_lr_scale=0.5", "data.files.train=x", "task.max_len=8", *extra])
    model_cfg = config_lib.model_config(cfg, 7)
    params = Classifier(model_cfg, 2).init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))["params"]
    params = jax.tree.map(jnp.zeros_like, params)
    tx = optim.make_optimizer(cfg.optim, 10, finetune.lr_groups(cfg, model_cfg, head="head"))
    return tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)[0]

  rates = lambda tree: {float(r) for x in jax.tree.leaves(tree) for r in np.unique(-np.asarray(x))}
  plain = updates()
  assert {"embed", "pos_embed", "block_0", "block_1", "ln_f"} <= set(plain["body"])
  assert rates(plain["head"]) == {1.0} and rates(plain["body"]) == {0.5}
  decayed = updates("finetune.layer_lr_decay=2.0")
  assert rates(decayed["head"]) == {1.0}
  assert rates(decayed["body"]["ln_f"]) == {0.5}
  assert rates(decayed["body"]["block_1"]) == {0.25} and rates(decayed["body"]["block_0"]) == {0.125}
  assert rates(decayed["body"]["embed"]) == rates(decayed["body"]["pos_embed"]) == {0.0625}


# The language-modelling path through the task interface: the same numbers, to the bit, as the
# trainer gave before tasks existed (recorded with jax 0.10.2 on this project's 2-core AMD EPYC
# before the change, and checked there against the old code). XLA's CPU code may round
# differently on another processor or version: there the numbers must agree to 1e-5.
LM_GOLDEN = {"jax": "0.10.2", "backend": "cpu", "cpu": "AMD EPYC",  # (train_loss, grad_norm[, val_loss])
             "records": [[3.029689073562622, 0.2761484980583191],
                         [2.911231279373169, 0.408409059047699, 2.8172390460968018]]}


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
  except OSError:
    return ""


def test_language_modelling_is_bitwise_what_it_was(tmp_path):
  from support import overrides, write_corpus

  if jax.default_backend() != LM_GOLDEN["backend"]:
    pytest.skip(f"golden numbers recorded on {LM_GOLDEN['backend']}")
  corpus = write_corpus(tmp_path / "c.txt")
  # Recorded with XLA's default CPU code generation: trained in a process without the suite's
  # fast-compile flags (conftest), whose unoptimized code rounds differently.
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if f not in conftest.FAST_COMPILE_FLAGS]
  proc = subprocess.run([sys.executable, "-m", "nlm_jax", "train",
                         *overrides(tmp_path / "r", corpus, "lstm", "streams", steps=10, model__dropout=0.1,
                                    optim__grad_accum=2)],
                        env=dict(os.environ, XLA_FLAGS=" ".join(flags)), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  records = [[r[k] for k in ("train_loss", "grad_norm", "val_loss") if k in r] for r in metrics(tmp_path / "r")]
  if jax.__version__ == LM_GOLDEN["jax"] and _cpu_model() == LM_GOLDEN["cpu"]:
    assert records == LM_GOLDEN["records"]
  else:
    assert [len(r) for r in records] == [len(r) for r in LM_GOLDEN["records"]]
    np.testing.assert_allclose(sum(records, []), sum(LM_GOLDEN["records"], []), rtol=1e-5)


# ----------------------------------------------------------------------------- translation


def write_parallel(directory, n_train: int = 400, n_val: int = 50, seed: int = 0) -> str:
  """prefix.{en,de} per split of a word-for-word 'translation' (ending in an empty line, as
  Multi30k's files do); returns the directory."""
  import random

  rng = random.Random(seed)
  lexicon = {"the": "die", "cat": "katze", "dog": "hund", "sees": "sieht", "a": "eine", "bird": "vogel",
             "big": "grosse", "small": "kleine", "red": "rote", "house": "haus", "tree": "baum"}
  for split, n in (("train", n_train), ("val", n_val)):
    en = [" ".join(["the", rng.choice(["big", "small", "red"]), rng.choice(["cat", "dog", "bird"]), "sees", "a",
                    rng.choice(["house", "tree", "bird"])]) for _ in range(n)]
    for lang, lines in (("en", en), ("de", [" ".join(lexicon[w] for w in line.split()) for line in en])):
      with open(f"{directory}/{split}.{lang}", "w") as f:
        f.write("\n".join(lines) + "\n\n")
  return str(directory)


def translation(workdir, data, steps=150, arch="transformer", **extra) -> list[str]:
  out = [f"workdir={workdir}", "task.kind=translate", f"data.files.train={data}/train",
         f"data.files.validation={data}/val", "tokenizer.kind=word", "task.max_len=32", "task.max_decode_len=16",
         "data.batch_size=16", f"train.steps={steps}", "train.eval_every=50", "train.log_every=10",
         "train.progress=false", "optim.lr=3e-3", "seed=1", *BODIES[arch],
         *(["model.d_model=32"] if arch == "transformer" else [])]
  return out + [f"{k.replace('__', '.')}={v}" for k, v in extra.items()]


def test_translate_end_to_end_through_the_cli(tmp_path):
  data = write_parallel(tmp_path)
  summary = train(*translation(tmp_path / "r", data))
  assert summary["final_validation_bleu"] > 90, summary  # a word-for-word mapping: learnt
  code, out, err = run_cli("translate", "--workdir", tmp_path / "r", "--text", "the red dog sees a tree",
                           "--beam-size", "1")
  assert code == 0, err
  assert out.strip() == "die rote hund sieht eine baum"
  code, out, err = run_cli("eval", "--workdir", tmp_path / "r", "--json")
  assert code == 0, err
  assert json.loads(out)["bleu"] == pytest.approx(summary["final_validation_bleu"])


def test_translation_loss_counts_the_target_only():
  from nlm_jax.data.tokenizers import WordTokenizer
  from nlm_jax.tasks.translate import collate, encode_pairs

  tok = WordTokenizer.train("a b c\nx y\n")
  seqs, starts, cut = encode_pairs(tok, ["a b c"], ["x y"], max_len=32)
  eos = tok.eos_id
  ids = lambda words: [tok.index[w] for w in words.split()]
  assert seqs[0].tolist() == [eos, *ids("a b c"), eos, *ids("x y"), eos] and starts[0] == 5 and cut == 0
  batch = collate(seqs, starts, rows=2, max_len=32)
  scored = batch["targets"][0][batch["mask"][0] == 1].tolist()
  assert scored == [*ids("x y"), eos]  # the target's words and its end, not the source
  assert batch["mask"][1].sum() == 0  # a padding row
  seqs, starts, cut = encode_pairs(tok, ["a b c"], ["x y x y x y"], max_len=8)
  assert len(seqs[0]) == 9 and cut == 1  # the target is cut to max_len predictions
  assert seqs[0].tolist() == [eos, *ids("a b c"), eos, *ids("x y x y")]
  # a long source with a short target: the pair fits, so the source is whole
  seqs, starts, cut = encode_pairs(tok, ["a b c a b c a"], ["x"], max_len=10)
  assert seqs[0].tolist() == [eos, *ids("a b c a b c a"), eos, *ids("x"), eos] and cut == 0
  # it does not fit: the source keeps what the target leaves, at least max_len // 2 + 1 ids
  seqs, starts, cut = encode_pairs(tok, ["a b c a b c a"], ["x"], max_len=9)
  assert seqs[0].tolist() == [eos, *ids("a b c a b c a"), *ids("x"), eos] and starts[0] == 8 and cut == 1
  seqs, starts, cut = encode_pairs(tok, ["a b c a b c a"], ["x y x y x y"], max_len=9)
  assert seqs[0].tolist() == [eos, *ids("a b c a"), *ids("x y x y x")] and cut == 1


def test_parallel_files_of_different_lengths_are_one_line_error(tmp_path):
  from test_errors import expect_error

  data = write_parallel(tmp_path)
  with open(f"{data}/val.de", "a") as f:
    f.write("noch eine zeile\n")
  expect_error("train", *translation(tmp_path / "r", data, steps=2), must_mention="line-aligned")


def sharp_lstm():
  """A tiny LSTM whose random next-token distributions are peaked and rarely end (id 3)."""
  import flax.linen as nn

  from nlm_jax.models import LSTMConfig, build

  model = build(LSTMConfig(vocab_size=4, d_embed=8, d_hidden=8, n_layers=1))
  params = nn.unbox(model.init(jax.random.key(7), jnp.zeros((1, 3), jnp.int32))["params"])
  params = jax.tree.map(lambda x: 4 * x, params)
  params["out"]["bias"] = params["out"]["bias"].at[3].add(-1.5)
  return model, params


def test_beam_search_is_exhaustive_when_the_beam_holds_every_hypothesis():
  import itertools

  from nlm_jax.decoding import beam_search, length_penalty

  model, params = sharp_lstm()
  eos, max_len, alpha = 3, 4, 1.5
  prompts = [[1, 2, 0], [2]]
  found, scores = beam_search(model, params, prompts, eos, beam_size=64, max_len=max_len, length_penalty=alpha,
                              batch_size=2, return_scores=True)
  for prompt, out, score in zip(prompts, found, scores):
    best = None  # every continuation that ends in eos within max_len tokens, or has max_len tokens
    for n in range(1, max_len + 1):
      conts = [c for c in itertools.product(range(4), repeat=n) if eos not in c[:-1] and (n == max_len or c[-1] == eos)]
      seqs = jnp.asarray([prompt + list(c) for c in conts])  # all of length n in one batch
      logp = np.asarray(jax.nn.log_softmax(model.apply({"params": params}, seqs).logits, -1))
      P = len(prompt)
      for b, cont in enumerate(conts):
        total = sum(float(logp[b, P - 1 + j, cont[j]]) for j in range(n))
        candidate = (total / float(length_penalty(n, alpha)), list(cont))
        best = max(best or candidate, candidate)
    assert out == (best[1][:-1] if best[1][-1] == eos else best[1])
    assert score == pytest.approx(best[0], abs=1e-5)
  assert any(len(out) > 0 for out in found)  # not only the trivial immediate end


def reference_beam_search(model, params, prompt, eos, K, max_len, alpha, min_len=0):
  """Beam search as the textbook states it, each prefix's distribution recomputed from scratch:
  per step the best 2K extensions of the K alive beams (no end among the first min_len tokens);
  those that end (or reach max_len) are finished, scored log P / lp(n); the best K of the others
  stay alive. Runs to max_len."""
  from nlm_jax.decoding import length_penalty

  V = model.cfg.vocab_size

  def next_logp(seq):  # eager, in float64: no compilation per prefix length
    logits = np.asarray(model.apply({"params": params}, seq[None]).logits[0, -1], np.float64)
    return logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())

  alive, finished = [(0.0, [])], []
  for n in range(1, max_len + 1):
    cands = []
    for logp, cont in alive:
      dist = next_logp(jnp.asarray(prompt + cont))
      cands += [(logp + float(dist[v]), cont + [v]) for v in range(V) if v != eos or n > min_len]
    cands = sorted(cands, key=lambda c: -c[0])[:2 * K]
    finished += [(logp / float(length_penalty(n, alpha)), cont) for logp, cont in cands
                 if cont[-1] == eos or n == max_len]
    alive = [c for c in cands if c[1][-1] != eos][:K]
  score, cont = max(finished)
  return (cont[:-1] if cont[-1] == eos else cont), score


@dataclasses.dataclass(frozen=True)
class Bigram:
  """A first-order Markov language model with the library's calling convention (the carry is the
  last token): `params["logits"][a, b]` is the logit of b after a. Its search spaces are easy to
  design by hand."""
  vocab_size: int

  @property
  def cfg(self):
    return types.SimpleNamespace(vocab_size=self.vocab_size, arch="bigram")

  def initial_carry(self, n):
    return jnp.zeros((n,), jnp.int32)

  def apply(self, variables, tokens, carry=None):
    return types.SimpleNamespace(logits=variables["params"]["logits"][tokens], carry=tokens[:, -1])


def test_an_ending_hypothesis_does_not_cost_the_beam_a_slot():
  from nlm_jax.decoding import beam_search

  # After the prompt (id 0): 1 (p .45), the end 4 (p .30), 2 (p .25). After 1 every id is as
  # likely (a dead end); after 2 the end is certain. With two beams and α = 1, "2 <end>" scores
  # log .25 / lp(2) = −1.188 and beats "<end>" (log .30 / lp(1) = −1.204): a search that let the
  # early end take one of its two slots keeps only 1 alive and never sees 2.
  logits = np.zeros((5, 5), np.float32)
  logits[0, :] = np.log([1e-9, 0.45, 0.25, 1e-9, 0.30])
  logits[2, :] = np.log([1e-9, 1e-9, 1e-9, 1e-9, 1.0])
  found = beam_search(Bigram(5), {"logits": jnp.asarray(logits)}, [[0]], 4, beam_size=2, max_len=4,
                      length_penalty=1.0)
  assert found == [[2]]
  # and the search stops after those two tokens: the best alive beam, "1 x" (log P = −2.41), can
  # score at most −2.41 / lp(4) = −1.61 < −1.188
  from nlm_jax.decoding import _beam_search

  search = functools.partial(_beam_search, Bigram(5), {"logits": jnp.asarray(logits)}, eos_id=4, beam_size=2,
                             max_len=4, alpha=1.0)
  assert int(search(jnp.zeros((1, 1), jnp.int32), jnp.ones((1,), jnp.int32))[-1]) == 2
  # Rows that only fill a batch (from n_rows on) do not keep it going: here three with 4-token
  # prompts, which alone would take the loop past their prompts.
  lengths = jnp.asarray([1, 4, 4, 4])
  assert int(search(jnp.zeros((4, 4), jnp.int32), lengths, jnp.asarray(1))[-1]) == 2
  assert int(search(jnp.zeros((4, 4), jnp.int32), lengths)[-1]) > 4


def test_beam_search_does_not_stop_while_a_longer_hypothesis_can_still_win():
  from nlm_jax.decoding import beam_search

  # After the prompt (id 0): the end 5 (p .45, score log .45 = −0.80), 4 (p .35, a dead end:
  # every id equally likely after it) and 1 (p .20); after 1 the text runs 2 3 2 3 ... with
  # certainty, never ending. With α = 2, "1 2 3 2 3 2" (cut at max_len 6) scores log .2 / lp(6) =
  # −0.48 and wins. After two tokens its log P (−1.61) over lp(3) is −0.91, below the end's −0.80:
  # a search that bounded a beam's future by the next length's penalty, not the largest one
  # ahead, would stop there and return the end.
  logits = np.zeros((6, 6), np.float32)
  logits[0, :] = np.log([1e-9, 0.20, 1e-9, 1e-9, 0.35, 0.45])
  for a, b in [(1, 2), (2, 3), (3, 2)]:
    logits[a, :] = np.log(np.where(np.arange(6) == b, 1.0, 1e-9))
  found, scores = beam_search(Bigram(6), {"logits": jnp.asarray(logits)}, [[0]], 5, beam_size=2, max_len=6,
                              length_penalty=2.0, return_scores=True)
  assert found == [[1, 2, 3, 2, 3, 2]] and scores[0] == pytest.approx(np.log(0.2) / (11 / 6) ** 2, abs=1e-5)


def test_beam_search_equals_the_reference_beam_search():
  """Random sharp bigram models whose best continuations have many lengths: the batched search
  (rows of different prompt lengths together, stopped early once no alive beam can win) returns
  what the textbook search to max_len returns, hypothesis and score."""
  from nlm_jax.decoding import beam_search

  V, eos, max_len = 7, 6, 8
  prompts = [[1, 2, 0], [2], [4, 4], [3, 1, 2, 4], [0], [5, 1], [3], [2, 2, 5]]
  lengths = set()
  for seed in range(3):
    logits = 2.5 * jax.random.normal(jax.random.key(seed), (V, V))
    params = {"logits": logits.at[:, eos].add(-1.0)}
    for K, alpha, min_len in [(2, 0.6, 0), (3, 1.0, 0), (4, 0.0, 0), (3, 0.6, 2)]:
      found, scores = beam_search(Bigram(V), params, prompts, eos, beam_size=K, max_len=max_len,
                                  length_penalty=alpha, batch_size=4, return_scores=True, min_len=min_len)
      for prompt, out, score in zip(prompts, found, scores):
        want, want_score = reference_beam_search(Bigram(V), params, prompt, eos, K, max_len, alpha, min_len)
        assert len(out) >= min_len
        assert (out, score) == (want, pytest.approx(want_score, abs=1e-5)), (seed, K, alpha, prompt)
        lengths.add(len(out))
  assert len(lengths) >= 4, lengths  # not only immediate ends, or only max_len


def test_prefix_lm_beam_search_of_one_token_prompts(transformer_config):
  """A one-token prompt has an empty prefix: the prefix-LM search is the causal one (it divided by
  zero feeding the empty prefix)."""
  from nlm_jax.decoding import beam_search
  from nlm_jax.models import build

  model = build(transformer_config)
  params = model.init(jax.random.key(3), jnp.zeros((1, 3), jnp.int32))["params"]
  prompts = [[1], [4]]
  found = beam_search(model, params, prompts, 0, beam_size=2, max_len=5, prefix_lm=True)
  assert found == beam_search(model, params, prompts, 0, beam_size=2, max_len=5)
  assert any(found)


@pytest.mark.parametrize("arch", ["lstm", "transformer", "fnn"])
def test_beam_search_with_one_beam_is_greedy(arch, request):
  from nlm_jax.decoding import beam_search, greedy
  from nlm_jax.models import build

  cfg = request.getfixturevalue(f"{arch}_config")
  model = build(cfg)
  params = model.init(jax.random.key(3), jnp.zeros((1, 3), jnp.int32))["params"]
  prompts = [[1, 2, 3, 4, 5], [2], [4, 4, 4]]  # different lengths decode in one batch
  found = beam_search(model, params, prompts, 0, beam_size=1, max_len=8, batch_size=2)  # 5 + 8 − 1 ≤ context 12
  assert found == greedy(model, params, prompts, 0, max_len=8)
  assert any(len(out) > 1 for out in found)


def test_sacrebleu_of_the_references_against_themselves_is_100():
  import sacrebleu

  refs = ["Zwei junge Männer sind im Freien.", "Ein kleines Mädchen klettert in ein Spielhaus."]
  assert sacrebleu.corpus_bleu(refs, [refs]).score == pytest.approx(100.0)


def test_prefix_lm_mask_and_cached_prefix_decoding(transformer_config):
  from nlm_jax.decoding import beam_search
  from nlm_jax.models import build

  model = build(transformer_config)
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 1, transformer_config.vocab_size)
  params = model.init(jax.random.key(1), tokens)["params"]
  prefix = jnp.asarray([4, 0])  # row 0: a prefix of 4 tokens; row 1: plain causal
  logits = lambda t: model.apply({"params": params}, t, prefix_B=prefix).logits
  moved = np.abs(np.asarray(logits(tokens.at[:, 3].add(1)) - logits(tokens))).max(-1) > 1e-6
  assert moved[0].tolist() == [True] * 8  # inside the prefix, earlier positions see token 3 too
  assert moved[1].tolist() == [False] * 3 + [True] * 5  # causal
  # The prefix enters the KV cache in one call, the rest a token at a time: the same logits.
  out = model.apply({"params": params}, tokens[:, :4], model.initial_carry(2), prefix_B=prefix)
  steps, carry = [out.logits], out.carry
  for t in range(4, 8):
    out = model.apply({"params": params}, tokens[:, t:t + 1], carry)
    steps.append(out.logits)
    carry = out.carry
  np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1)[0]), np.asarray(logits(tokens)[0]), atol=1e-5)

  # Beam search with one beam on a prefix LM = greedy by full recomputation with the same mask.
  prompts = [[1, 2, 3, 4], [5, 6, 7, 8], [2, 2]]
  found = beam_search(model, params, prompts, 0, beam_size=1, max_len=6, batch_size=2, prefix_lm=True)
  # (a fixed length of 10 = 4 + 6 recomputed each step: causal after the prefix, so what follows
  # the sequence so far, zeros here, does not change the logits read at its end)
  full = jax.jit(lambda seq, p: model.apply({"params": params}, seq[None], prefix_B=p[None]).logits[0])
  for prompt, out in zip(prompts, found):
    seq = list(prompt)
    while len(seq) - len(prompt) < 6:
      padded = jnp.asarray(seq + [0] * (10 - len(seq)))
      nxt = int(jnp.argmax(full(padded, jnp.asarray(len(prompt) - 1))[len(seq) - 1]))
      if nxt == 0:
        break
      seq.append(nxt)
    assert out == seq[len(prompt):]


@pytest.mark.slow  # the prefix mask and its cached decoding are tested above, in CI
def test_translate_prefix_lm_end_to_end(tmp_path):
  data = write_parallel(tmp_path, n_train=200)
  summary = train(*translation(tmp_path / "r", data, steps=60, task__prefix_lm="true", task__beam_size=2))
  assert 0 <= summary["final_validation_bleu"] <= 100
  from test_errors import expect_error

  expect_error("train", *translation(tmp_path / "e", data, steps=2, arch="lstm", task__prefix_lm="true"),
               must_mention="prefix_lm")


def test_tfds_sources_of_both_tasks(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  from nlm_jax.config import DataConfig
  from nlm_jax.data.corpus import prepare_tfds
  from nlm_jax.tasks.classify import read_tfds
  from nlm_jax.tasks.translate import read_tfds_pairs

  class NlmJaxTinyPairs(tfds.core.GeneratorBasedBuilder):
    """Sentences with a label and a translation, generated in the test (like glue/sst2, multi30k)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"sentence": tfds.features.Text(), "label": tfds.features.ClassLabel(num_classes=2),
           "en": tfds.features.Text(), "de": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(6), "validation": self._generate_examples(2)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"sentence": f"text {i}", "label": i % 2, "en": f"the cat {i}", "de": f"die katze {i}"}

  data_dir = str(tmp_path / "tfds")
  prepare_tfds(NlmJaxTinyPairs.name, None, data_dir)
  cfg = DataConfig(source="tfds", name=NlmJaxTinyPairs.name, data_dir=data_dir)
  texts, labels = read_tfds(cfg, "train", "sentence", "label")
  assert sorted(zip(texts, labels)) == sorted((f"text {i}", str(i % 2)) for i in range(6))
  src, tgt = read_tfds_pairs(cfg, "validation", "en", "de")
  assert sorted(zip(src, tgt)) == [(f"the cat {i}", f"die katze {i}") for i in range(2)]
  with pytest.raises(Exception, match="no feature 'fr'"):
    read_tfds_pairs(cfg, "train", "en", "fr")


@pytest.mark.parametrize("eval_batches,eval_train_batches,expected", [
    (None, None, [("validation", None), ("train", 2)]),  # as many as validation's 300 rows need (2 × 256)
    (3, None, [("validation", 3), ("train", 3)]),
    (None, 5, [("validation", None), ("train", 5)]),
    (None, 0, [("validation", None)]),
])
def test_eval_train_loss_reads_as_many_batches_as_validation(eval_batches, eval_train_batches, expected):
  # Not the whole training split: SST-2's is 77× its validation split, and evaluating it every
  # train.eval_every steps took most of a fine-tuning run's time.
  from nlm_jax import config as config_lib
  from nlm_jax.tasks.common import ExamplesRun

  yaml = lambda n: "null" if n is None else n

  class Run(ExamplesRun):
    def __init__(self):
      self.cfg = config_lib.load_config(None, ["workdir=x", "task.kind=classify", "data.files.train=x", "model.arch=lstm",
                                               "data.eval_batch_size=256", f"train.eval_batches={yaml(eval_batches)}",
                                               f"train.eval_train_batches={yaml(eval_train_batches)}"])
      self.calls = []

    def examples(self, split):
      return [np.zeros(3, np.int32)] * {"train": 23_000, "validation": 300}[split], None

    def eval_batch_size(self):
      return 256

    def evaluate(self, params, split, max_batches, *args):
      self.calls.append((split, max_batches))
      return {"loss": 0.0}

    def val_scores(self, val):
      return {}

  run = Run()
  run.periodic_evaluation(None, 10)
  assert run.calls == expected


@pytest.mark.parametrize("kind", ["lm", "classify", "translate"])
def test_every_task_gathers_recurrent_parameters_over_fsdp_in_its_train_step(tmp_path, sst, kind):
  """The RNN/LSTM train step all-gathers its parameters' fsdp dimensions before use (XLA gets their
  gradient wrong on a data × fsdp × tensor mesh otherwise: test_parallel's data2_fsdp2_tensor2),
  in every task's run, and only theirs; the state itself stays sharded as configured."""
  from nlm_jax import parallel
  from nlm_jax.config import load_config
  from nlm_jax.training import trainer

  def task_of(arch):
    if kind == "lm":
      args = [f"workdir={tmp_path / arch}", f"data.file={sst['lm']}", "tokenizer.kind=word", "data.batch_size=8",
              "data.seq_len=16", *BODIES[arch]]
    elif kind == "classify":
      args = classify(tmp_path / arch, sst, arch)
    else:
      args = translation(tmp_path / arch, write_parallel(tmp_path), arch=arch)
    return trainer.make_run(load_config(None, args)).task

  lstm, transformer = task_of("lstm"), task_of("transformer")
  assert transformer.gathered is None and lstm.gathered is not None
  assert jax.tree.structure(lstm.gathered) == jax.tree.structure(lstm.state_sharding.params)
  assert "lstm" in parallel.GATHER_FSDP_ARCHS and "rnn" in parallel.GATHER_FSDP_ARCHS


def test_translation_loss_reads_the_source_as_the_prefix_and_evaluates_the_likelihood(tmp_path):
  """A prefix-LM translation batch's prefix is [start] + the source, without its <eol> (the first
  causal position, as the last prompt token is in decoding: no target token leaks into a position
  that predicts one); the loss is the NLL of the prefix-LM's logits (not the causal ones), label
  smoothed in training only: evaluation reports the likelihood, computed here in NumPy."""
  from nlm_jax.config import load_config
  from nlm_jax.training import trainer

  eps = 0.1
  run = trainer.make_run(load_config(None, translation(tmp_path / "r", write_parallel(tmp_path, n_val=20),
                                                       task__prefix_lm="true", task__label_smoothing=eps)))
  params = jax.device_get(run.task.init(jax.random.key_data(jax.random.key(0))).params)
  params = jax.tree.map(lambda x: 4 * x, params)  # sharper attention: a misread mask shows
  seqs, starts = run.examples("validation")
  n = len(seqs)
  batch = {k: jnp.asarray(v) for k, v in run.collate(list(range(n)), "validation", n).items()}
  np.testing.assert_array_equal(np.asarray(batch["prefix"]), starts - 1)
  inputs, targets, mask = (np.asarray(batch[k]) for k in ("inputs", "targets", "mask"))

  def logp(prefix):
    out = run.model.apply({"params": params}, jnp.asarray(inputs), None, prefix_B=prefix)
    return np.asarray(jax.nn.log_softmax(np.asarray(out.logits, np.float64)))

  def nll(lp, smoothing=0.0):
    picked = np.take_along_axis(lp, targets[..., None], -1)[..., 0]
    per_token = -(1 - smoothing) * picked - smoothing * lp.mean(-1)
    return float((per_token * mask).sum())

  prefix_lp = logp(jnp.asarray(starts - 1))
  # no leak: changing a row's first target token changes no logit of the positions before it
  leak = run.model.apply({"params": params}, jnp.asarray(inputs).at[0, starts[0]].add(1), None,
                         prefix_B=batch["prefix"]).logits
  full = run.model.apply({"params": params}, jnp.asarray(inputs), None, prefix_B=batch["prefix"]).logits
  np.testing.assert_array_equal(np.asarray(leak[0, :starts[0]]), np.asarray(full[0, :starts[0]]))

  objective = jax.jit(lambda p, b, k, d: run.task._objective(p, b, None, k, deterministic=d)[:2],
                      static_argnums=3)
  loss_sum, count = objective(params, batch, jax.random.key(0), True)
  assert float(count) == mask.sum()
  np.testing.assert_allclose(float(loss_sum), nll(prefix_lp), rtol=1e-5)
  assert abs(float(loss_sum) - nll(logp(None))) > 1e-3 * nll(prefix_lp)  # the causal reading: another loss
  smoothed, _ = objective(params, batch, jax.random.key(0), False)  # dropout 0: the same logits
  np.testing.assert_allclose(float(smoothed), nll(prefix_lp, eps), rtol=1e-5)
  assert abs(nll(prefix_lp, eps) - nll(prefix_lp)) > 1e-3 * nll(prefix_lp)
  evaluated = run.evaluate(params, "validation", None)
  assert evaluated["tokens"] == mask.sum()
  np.testing.assert_allclose(evaluated["loss"], nll(prefix_lp) / mask.sum(), rtol=1e-5)


def test_translate_asks_beam_search_for_the_task_settings_and_returns_each_source_s_translation(
    tmp_path, monkeypatch):
  """`translate` hands the search [start] + each source line + <eol>, cut to task.max_len // 2 + 1
  ids; a Transformer's translation has at most what the context leaves after the longest prompt
  (context + 1 − its length: the last prompt token's prediction is the first translated one) or
  task.max_decode_len; the search gets task.min_decode_len and the length penalty asked for
  (task.length_penalty by default, 0 too); and each output goes back to its own source, whatever
  order the search ran them in (a spy returns each prompt's own words)."""
  from nlm_jax import decoding
  from nlm_jax.config import load_config
  from nlm_jax.training import trainer

  run = trainer.make_run(load_config(None, translation(tmp_path / "r", write_parallel(tmp_path, n_train=40),
                                                       task__max_decode_len=30, task__min_decode_len=2,
                                                       task__length_penalty=0.6, task__beam_size=3)))
  tok, eol = run.tokenizer, run.eol
  calls = []

  def spy(model, params, prompts, eos_id, beam_size, max_len, alpha, **kwargs):
    calls.append(dict(prompts=[list(map(int, p)) for p in prompts], eos_id=eos_id, beam_size=beam_size,
                      max_len=max_len, alpha=alpha, **kwargs))
    return [[i for i in p if i != eol] for p in prompts]  # the prompt's own words back (start = eol here)

  monkeypatch.setattr(decoding, "beam_search", spy)
  long_ = " ".join(["the big cat sees a tree"] * 3 + ["a bird"])  # 20 words: over max_len // 2 = 16
  sources = [long_, "the red dog sees a house", "a cat", "the bird sees a small tree today"]
  assert run.translate(None, sources) == [" ".join(long_.split()[:16]), *sources[1:3],
                                          "the bird sees a small tree <unk>"]
  call = calls[-1]
  prompt = lambda s, n=None: [tok.start_id, *tok.encode(s + "\n")[:n]]
  want = [prompt(long_, 16), *(prompt(s) for s in sources[1:])]
  assert len(want[0]) == 32 // 2 + 1 and sorted(call["prompts"]) == sorted(want)
  assert call["max_len"] == 32 + 1 - 17  # the context's room after the longest prompt (< max_decode_len 30)
  assert (call["eos_id"], call["beam_size"], call["min_len"], call["alpha"]) == (eol, 3, 2, 0.6)
  assert call["prefix_lm"] is False
  run.translate(None, sources[1:], beam_size=2, length_penalty=0.25)
  assert (calls[-1]["beam_size"], calls[-1]["alpha"], calls[-1]["max_len"]) == (2, 0.25, 33 - 9)  # 7 words + 2
  run.translate(None, sources[1:], length_penalty=0.0, max_len=5)
  assert (calls[-1]["alpha"], calls[-1]["max_len"]) == (0.0, 5)


def test_classify_training_smooths_the_labels_and_drops_the_pooled_state_evaluation_does_neither(tmp_path, sst):
  """task.label_smoothing = ε: the training loss is the cross-entropy of the logits read in
  training against (1 − ε)·one-hot + ε/C (computed here in NumPy), not their NLL; task.head_dropout
  (model.dropout 0: the only dropout): training's logits depend on the dropout key, evaluation's
  are the same every time, and evaluation's loss is their NLL."""
  from nlm_jax.config import load_config
  from nlm_jax.training import trainer

  eps = 0.1
  run = trainer.make_run(load_config(None, classify(tmp_path / "r", sst, task__label_smoothing=eps,
                                                    task__head_dropout=0.5, model__dropout=0)))
  params = jax.device_get(run.task.init(jax.random.key_data(jax.random.key(0))).params)
  params["head"] = jax.tree.map(lambda x: 20 * x, params["head"])  # confident logits: smoothing shows
  batch = {k: jnp.asarray(v) for k, v in run.collate(list(range(12)), "train", 16).items()}  # 4 padding rows
  y, w = np.asarray(batch["labels"]), np.asarray(batch["weights"])
  logits = jax.jit(run.task._logits, static_argnums=3)
  objective = jax.jit(lambda p, b, k, d: run.task._objective(p, b, None, k, deterministic=d)[:2], static_argnums=3)

  def cross_entropy(logits_BxC, smoothing):
    lp = np.asarray(jax.nn.log_softmax(np.asarray(logits_BxC, np.float64)))
    per_row = -(1 - smoothing) * lp[np.arange(len(y)), y] - smoothing * lp.mean(-1)
    return float((w * per_row).sum())

  key = jax.random.key(5)
  trained = logits(params, batch, key, False)
  assert not np.allclose(np.asarray(trained), np.asarray(logits(params, batch, jax.random.key(6), False)))
  evaluated = logits(params, batch, None, True)
  assert not np.allclose(np.asarray(trained), np.asarray(evaluated))
  np.testing.assert_array_equal(np.asarray(evaluated), np.asarray(logits(params, batch, None, True)))
  loss_sum, count = objective(params, batch, key, False)
  assert float(count) == 12
  np.testing.assert_allclose(float(loss_sum), cross_entropy(trained, eps), rtol=1e-5)
  assert abs(cross_entropy(trained, eps) - cross_entropy(trained, 0.0)) > 1e-2 * cross_entropy(trained, 0.0)
  _, evaluation = jax.jit(run.task._eval_metrics)(params, None, batch)
  np.testing.assert_allclose(float(evaluation["nll_sum"]), cross_entropy(evaluated, 0.0), rtol=1e-5)


def test_word_dropout_never_drops_the_start_or_the_end_of_a_sentencepiece_text(tmp_path, sst):
  """SentencePiece texts begin with <s> and end with </s>, two ids (a word tokenizer's are one):
  word dropout keeps both, even at rate 1, and every other token of the text becomes <unk>."""
  from nlm_jax.config import load_config
  from nlm_jax.tasks.classify import drop_words
  from nlm_jax.training import trainer

  run = trainer.make_run(load_config(None, classify(tmp_path / "r", sst, tokenizer__kind="sentencepiece",
                                                    tokenizer__vocab_size=60, task__word_dropout=0.5)))
  tok = run.tokenizer
  assert tok.start_id != tok.eos_id
  assert sorted(run.task.keep_ids) == sorted([tok.start_id, tok.eos_id])
  batch = run.collate(list(range(8)), "train", 8)
  tokens, mask = batch["inputs"], batch["mask"]
  out = np.asarray(drop_words(jax.random.key(0), jnp.asarray(tokens), jnp.asarray(mask), 1.0, tok.unk_id,
                              run.task.keep_ids))
  ends = mask.sum(1).astype(int) - 1
  assert (tokens[:, 0] == tok.start_id).all() and (tokens[np.arange(8), ends] == tok.eos_id).all()
  marker = np.isin(tokens, [tok.start_id, tok.eos_id])
  np.testing.assert_array_equal(out, np.where((mask > 0) & ~marker, tok.unk_id, tokens))


def test_a_text_is_its_start_and_ids_cut_to_max_len():
  """encode_texts: [start] + encode(text), max_len ids at most: a text of max_len ids stays whole,
  a longer one keeps its first max_len (its end marker cut off)."""
  from nlm_jax.data.tokenizers import WordTokenizer
  from nlm_jax.tasks.classify import encode_texts

  tok = WordTokenizer.train("a b c d e f\n")
  ids = lambda words: [tok.index[w] for w in words.split()]
  start, eos = tok.start_id, tok.eos_id
  out = encode_texts(tok, ["a b c", "a b c d e f", "b"], max_len=5)
  assert [x.tolist() for x in out] == [[start, *ids("a b c"), eos], [start, *ids("a b c d")], [start, *ids("b"), eos]]
  assert all(x.dtype == np.int32 for x in out)


def test_per_class_counts_of_an_evaluation_are_each_class_s_own(tmp_path, sst):
  """evaluate's per_class: each class's examples and correct predictions; a head biased to class
  1 predicts it for every text: class 0 has none right, class 1 all of its examples."""
  from nlm_jax.config import load_config
  from nlm_jax.tasks.classify import read_tsv
  from nlm_jax.training import trainer

  run = trainer.make_run(load_config(None, classify(tmp_path / "r", sst)))
  params = jax.device_get(run.task.init(jax.random.key_data(jax.random.key(0))).params)
  params["head"]["bias"] = np.asarray([-30.0, 30.0], np.float32)
  n1 = read_tsv(sst["dev"], "sentence", "label")[1].count("1")
  assert 0 < n1 < 100
  result = run.evaluate(params, "validation", None)
  assert result["per_class"] == {"0": {"examples": 100 - n1, "correct": 0}, "1": {"examples": n1, "correct": n1}}
  assert result["accuracy"] == n1 / 100 and result["examples"] == 100


def test_an_ensemble_s_scores_against_hand_computed_ones():
  """`ensemble`: the members' class probabilities averaged; loss (mean −log p̄(y)), accuracy and per
  class the examples and the correct ones, of the average and of each member, worked out by hand."""
  from nlm_jax.tasks.classify import ensemble

  y = np.asarray([0, 0, 0, 1, 1])
  probs = {"a": [[.9, .1], [.6, .4], [.3, .7], [.2, .8], [.4, .6]],  # right: 1 1 0 1 1
           "b": [[.7, .3], [.2, .8], [.4, .6], [.6, .4], [.1, .9]]}  # right: 1 0 0 0 1
  texts = ["t0", "t1", "t2", "t3", "t4"], ["neg", "neg", "neg", "pos", "pos"]

  def member(name):
    return types.SimpleNamespace(cfg=types.SimpleNamespace(task=types.SimpleNamespace(kind="classify")),
                                 labels=["neg", "pos"], raw=lambda split: texts, examples=lambda split: (None, y),
                                 split_probabilities=lambda params, split: np.asarray(probs[name], np.float32))

  result = ensemble([(name, member(name), None) for name in "ab"], "validation")
  # the average: .8 .2 | .4 .6 | .35 .65 | .4 .6 | .25 .75, right: 1 0 0 1 1
  assert result["runs"] == 2 and result["examples"] == 5 and result["accuracy"] == pytest.approx(3 / 5)
  assert result["loss"] == pytest.approx(-np.log([.8, .4, .35, .6, .75]).mean(), rel=1e-6)
  assert result["per_class"] == {"neg": {"examples": 3, "correct": 1}, "pos": {"examples": 2, "correct": 2}}
  a, b = result["members"]
  assert a["workdir"] == "a" and a["accuracy"] == pytest.approx(4 / 5) and b["accuracy"] == pytest.approx(2 / 5)
  assert a["loss"] == pytest.approx(-np.log([.9, .6, .3, .8, .6]).mean(), rel=1e-6)
  assert a["per_class"] == {"neg": {"examples": 3, "correct": 2}, "pos": {"examples": 2, "correct": 2}}
  assert b["per_class"] == {"neg": {"examples": 3, "correct": 1}, "pos": {"examples": 2, "correct": 1}}


def test_the_final_evaluation_reads_the_whole_split_and_a_step_counts_its_micro_batches(tmp_path, sst):
  """With train.eval_batches=1 the evaluation at the last step reads one batch: the final one
  still scores the whole validation split (not the periodic one's numbers); with
  optim.grad_accum=2 a step trains on 2 × data.batch_size examples (the log's and the summary's
  counts)."""
  from nlm_jax.config import load_config
  from nlm_jax.training import trainer

  args = classify(tmp_path / "r", sst, steps=2, train__eval_every=2, train__log_every=1, train__eval_batches=1,
                  optim__grad_accum=2)
  summary = train(*args)
  records = metrics(tmp_path / "r")
  assert [r["examples"] for r in records if "examples" in r] == [32, 64]
  assert summary["examples_seen"] == 2 * 2 * 16
  assert summary["final_validation_examples"] == 100
  run = trainer.make_run(load_config(None, args))
  params = jax.tree.map(jnp.asarray, final_state(tmp_path / "r")["params"])
  whole, first = run.evaluate(params, "validation", None), run.evaluate(params, "validation", 1)
  assert first["examples"] == 16 and records[-1]["val_loss"] == pytest.approx(first["loss"], rel=1e-6)
  assert summary["final_validation_loss"] == pytest.approx(whole["loss"], rel=1e-6) != first["loss"]
  assert summary["final_validation_per_class"] == whole["per_class"]


def test_the_data_fingerprint_changes_with_a_label(tmp_path, sst):
  """data_fingerprint hashes every part of a split's examples: one dev label flipped (the texts
  the same) changes the validation split's fingerprint, not the training split's."""
  from nlm_jax.config import load_config
  from nlm_jax.training import trainer

  with open(sst["dev"]) as f:
    lines = f.read().splitlines()
  text, label = lines[1].split("\t")
  flipped = tmp_path / "flipped.tsv"
  flipped.write_text("\n".join([lines[0], f"{text}\t{1 - int(label)}", *lines[2:]]) + "\n")
  fingerprint = lambda dev: trainer.make_run(load_config(None, classify(
      tmp_path / "r", sst, data__files__validation=dev))).data_fingerprint()
  before, again, after = fingerprint(sst["dev"]), fingerprint(sst["dev"]), fingerprint(flipped)
  assert before == again
  assert after["train"] == before["train"] and after["validation"] != before["validation"]


def test_finetune_starts_from_the_pretrained_run_s_best_checkpoint(tmp_path, sst, monkeypatch):
  """train.init_from loads the pretrained run's best checkpoint (lowest val_loss), not its latest:
  here step 2 of 3 (the validation losses saved with the checkpoints are set to 3, 1, 2)."""
  from nlm_jax.training.checkpoint import Checkpoints

  save = Checkpoints.save
  fake = {1: 3.0, 2: 1.0, 3: 2.0}

  def save_with_fake_loss(self, step, state, data_iter, config, tokenizer, val_loss=None, **kwargs):
    return save(self, step, state, data_iter, config, tokenizer, None if val_loss is None else fake[step], **kwargs)

  with monkeypatch.context() as patch:
    patch.setattr(Checkpoints, "save", save_with_fake_loss)
    pretrain(tmp_path / "pre", sst, steps=3, train__eval_every=1)
  ckpts = Checkpoints(str(tmp_path / "pre"), read_only=True)
  assert (ckpts.best_step(), ckpts.latest_step()) == (2, 3)
  ckpts.close()
  best, latest = (lm_body(final_state(tmp_path / "pre", step)["params"]) for step in (2, 3))
  assert not np.array_equal(best["embed"]["embedding"], latest["embed"]["embedding"])
  train(*classify(tmp_path / "ft", sst, steps=1, train__init_from=tmp_path / "pre", finetune__freeze_body_steps=1,
                  train__eval_every=1))
  assert_trees_equal(final_state(tmp_path / "ft", 1)["params"]["body"], best)
