"""Bad input: a one-line error naming the problem, exit status 2, nothing of the user's changed."""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np
import pytest

from support import final_state, overrides, run_cli, train, write_corpus


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
  monkeypatch.setenv("NLM_JAX_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def corpus(tmp_path):
  return write_corpus(tmp_path / "corpus.txt")


def snapshot(path) -> dict[str, str]:
  """Every file under `path` with the hash of its bytes."""
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      with open(full, "rb") as f:
        out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
  return out


def expect_error(*argv, must_mention: str) -> str:
  code, out, err = run_cli(*argv)
  assert code == 2, (code, out, err)
  lines = [line for line in err.splitlines() if line.startswith("nlm-jax: error:")]
  assert len(lines) == 1 and "Traceback" not in err, err
  assert must_mention.lower() in lines[0].lower(), lines[0]
  return lines[0]


def test_unknown_config_key(tmp_path, corpus):
  expect_error("train", *overrides(tmp_path / "r", corpus), "train.stpes=10", must_mention="stpes")
  expect_error("train", *overrides(tmp_path / "r", corpus), "model.n_layer=3", must_mention="n_layer")
  assert not (tmp_path / "r").exists()


def test_wrong_type(tmp_path, corpus):
  expect_error("train", *overrides(tmp_path / "r", corpus), "train.steps=ten", must_mention="train.steps")


def test_bad_value_names_the_field(tmp_path, corpus):
  expect_error("train", *overrides(tmp_path / "r", corpus), "model.d_model=30", must_mention="d_model")
  expect_error("train", *overrides(tmp_path / "r", corpus), "data.batching=sideways", must_mention="data.batching")


def test_cudnn_attention_with_deterministic_training(tmp_path, corpus):
  """XLA cannot compile cuDNN attention's backward pass under deterministic ops (H200, jax 0.11.2):
  said before anything starts, on any backend."""
  expect_error("train", *overrides(tmp_path / "r", corpus), "model.attention=cudnn", must_mention="train.deterministic")
  assert not (tmp_path / "r").exists()


def test_typo_in_yaml_recipe(tmp_path, corpus):
  recipe = tmp_path / "recipe.yaml"
  recipe.write_text("model:\n  arch: lstm\noptim:\n  learning_rate: 0.1\n")
  expect_error("train", "--config", recipe, f"workdir={tmp_path / 'r'}", f"data.file={corpus}",
               must_mention="learning_rate")
  expect_error("train", "--config", tmp_path / "nope.yaml", f"workdir={tmp_path / 'r'}", must_mention="nope.yaml")


def test_missing_data_file(tmp_path):
  expect_error("train", *overrides(tmp_path / "r", tmp_path / "absent.txt"), must_mention="absent.txt")


def test_empty_corpus(tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("  \n\n")
  expect_error("train", *overrides(tmp_path / "r", empty), must_mention="empty")


def test_undecodable_bytes(tmp_path):
  bad = tmp_path / "latin1.txt"
  bad.write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 50)
  expect_error("train", *overrides(tmp_path / "r", bad), must_mention="utf-8")


def test_unknown_tfds_name(tmp_path):
  expect_error("train", f"workdir={tmp_path / 'r'}", "data.source=tfds", "data.name=no_such_dataset_xyz",
               "model.arch=lstm", must_mention="no_such_dataset_xyz")


def test_tfds_not_prepared_fails_fast(tmp_path):
  start = time.time()
  expect_error("train", f"workdir={tmp_path / 'r'}", "data.source=tfds", "data.name=tiny_shakespeare",
               f"data.data_dir={tmp_path / 'tfds'}", "model.arch=lstm", must_mention="data prepare tiny_shakespeare")
  assert time.time() - start < 30


def test_data_prepare_without_network_or_manual_dir_fails_fast(tmp_path):
  start = time.time()
  expect_error("data", "prepare", "tiny_shakespeare", "--data-dir", tmp_path / "tfds", must_mention="--manual-dir")
  assert time.time() - start < 30


def test_nonempty_foreign_workdir_is_left_alone(tmp_path, corpus):
  workdir = tmp_path / "mine"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("my thesis")
  before = snapshot(workdir)
  expect_error("train", *overrides(workdir, corpus), must_mention="not empty")
  assert snapshot(workdir) == before


def test_checkpoint_of_another_model_config(tmp_path, corpus):
  workdir = tmp_path / "r"
  train(*overrides(workdir, corpus, steps=10))
  before = snapshot(workdir)
  msg = expect_error("train", *overrides(workdir, corpus, steps=20), "model.n_layers=3", must_mention="n_layers")
  assert "different config" in msg
  assert snapshot(workdir) == before


def test_init_from_with_another_vocabulary(tmp_path, corpus):
  train(*overrides(tmp_path / "pre", corpus, steps=10))
  expect_error("train", *overrides(tmp_path / "fine", corpus, steps=10), f"train.init_from={tmp_path / 'pre'}",
               "tokenizer.kind=word", must_mention="vocabulary")


def test_tokenizer_include_that_cannot_be_used(tmp_path, corpus):
  expect_error("train", *overrides(tmp_path / "r", corpus, steps=10), "tokenizer.kind=word",
               f"tokenizer.include={tmp_path / 'missing.txt'}", must_mention="tokenizer.include file not found")
  expect_error("train", *overrides(tmp_path / "r", corpus, steps=10), f"tokenizer.include={corpus}",
               must_mention="tokenizer.include is for tokenizer.kind=word")
  assert not (tmp_path / "r" / "checkpoints").exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, corpus):
  workdir = tmp_path / "r"
  args = overrides(workdir, corpus, steps=40, optim__name="sgd", optim__lr=0.1, train__checkpoint_every=2,
                   train__log_every=3)
  train(*args, "train.stop_after=4")  # a good start
  # Resumed with a learning rate that overflows float32: the parameters become inf, the loss NaN.
  msg = expect_error("train", *args, "optim.lr=1e38", must_mention="NaN or Inf")
  assert "last good checkpoint (step 4)" in msg
  state = final_state(workdir)
  assert all(np.isfinite(np.asarray(x)).all() for x in __import__("jax").tree.leaves(state["params"]))


def test_eval_of_missing_run(tmp_path):
  expect_error("eval", "--workdir", tmp_path / "nothing", must_mention="no nlm-jax run")
  expect_error("generate", "--workdir", tmp_path / "nothing", "--prompt", "x", must_mention="no nlm-jax run")


def test_prompt_outside_char_vocabulary(tmp_path, corpus):
  train(*overrides(tmp_path / "r", corpus, steps=5))
  expect_error("generate", "--workdir", tmp_path / "r", "--prompt", "Zebra", must_mention="'Z'")
