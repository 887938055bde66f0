"""Config loading: recipes validate, overrides are typed, the model section is checked per arch."""

from __future__ import annotations

import glob
import os
import re

import pytest

from nlm_jax import config as config_lib
from nlm_jax import models
from nlm_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "experiments", "configs", "*.yaml"))))
def test_every_recipe_validates(path):
  cfg = config_lib.load_config(path, ["workdir=/tmp/x"])
  model = config_lib.model_config(cfg, vocab_size=100)
  assert model.arch == cfg.model["arch"]
  models.build(model)


def test_nanogpt_recipe_is_nanogpts():
  cfg = config_lib.load_config(os.path.join(ROOT, "experiments/configs/shakespeare_char_transformer.yaml"),
                               ["workdir=/tmp/x"])
  m = config_lib.model_config(cfg, 65)
  assert (m.n_layers, m.n_heads, m.d_model, m.context, m.dropout) == (4, 4, 128, 64, 0.0)
  assert (cfg.data.batch_size, cfg.data.seq_len, cfg.train.steps) == (12, 64, 2000)
  o = cfg.optim
  assert (o.name, o.lr, o.b2, o.warmup_steps, o.min_lr) == ("adamw", 1e-3, 0.99, 100, 1e-4)
  assert (cfg.train.eval_every, cfg.train.eval_batches) == (250, 20)


def test_overrides_are_typed_and_dotted():
  cfg = config_lib.load_config(None, ["workdir=w", "data.file=f", "model.arch=lstm", "model.d_hidden=64",
                                      "train.steps=7", "optim.lr=0.5", "data.files.train=a.txt"])
  assert cfg.train.steps == 7 and cfg.optim.lr == 0.5 and cfg.data.files == {"train": "a.txt"}
  assert config_lib.model_config(cfg, 10).d_hidden == 64


def test_a_word_vocabulary_must_hold_a_word():
  base = ["workdir=w", "data.file=f", "model.arch=lstm", "tokenizer.kind=word"]
  with pytest.raises(UserError, match="tokenizer.vocab_size=2 holds no word"):
    config_lib.load_config(None, base + ["tokenizer.vocab_size=2"])
  assert config_lib.load_config(None, base + ["tokenizer.vocab_size=3"]).tokenizer.vocab_size == 3


def test_config_roundtrips_through_dict():
  cfg = config_lib.load_config(None, ["workdir=w", "data.file=f", "model.arch=fnn"])
  assert config_lib.from_dict(config_lib.to_dict(cfg)) == cfg


@pytest.mark.parametrize("override,mentions", [
    ("train.stpes=1", "stpes"), ("optim.lr=fast", "optim.lr"), ("model.arch=gru", "model.arch"),
    ("optim.name=lion", "optim.name"), ("mesh.data=0", "mesh.data"), ("model.context=1", "context"),
    ("optim.decay_exclude=[biases]", "biases"), ("tokenizer.kind=bpe", "tokenizer.kind"),
])
def test_bad_overrides_name_the_key(override, mentions):
  base = ["workdir=w", "data.file=f", "model.arch=fnn"]
  with pytest.raises(UserError, match=mentions.replace("[", r"\[")):
    config_lib.load_config(None, base + [override])


def test_every_task_key_names_the_kinds_that_read_it():
  import dataclasses

  assert set(config_lib.TASK_KEYS) == {f.name for f in dataclasses.fields(config_lib.TaskConfig)} - {"kind"}


@pytest.mark.parametrize("kind,override,mentions", [
    ("lm", "task.label_smoothing=0.5", "task.label_smoothing=0.5 is for task.kind=classify or translate, not lm"),
    ("lm", "task.prefix_lm=true", "task.prefix_lm=true is for task.kind=classify or translate"),
    ("translate", "task.pooling=mean", "task.pooling=mean is for task.kind=classify, not translate"),
    ("translate", "task.word_dropout=0.1", "task.word_dropout=0.1 is for task.kind=classify"),
    ("classify", "task.beam_size=2", "task.beam_size=2 is for task.kind=translate, not classify"),
    ("lm", "task.backward=true", "task.backward=true is for task.kind=classify, not lm"),
    ("classify", "train.eval_estimator=random_windows", "random_windows is for task.kind=lm"),
])
def test_a_task_setting_another_kind_would_ignore_is_an_error(kind, override, mentions):
  base = ["workdir=w", "data.file=f", "model.arch=lstm", f"task.kind={kind}"]
  config_lib.load_config(None, base + ["task.max_len=128"] if kind != "lm" else base)  # the defaults pass
  with pytest.raises(UserError, match=mentions):
    config_lib.load_config(None, base + [override])


@pytest.mark.parametrize("override,message", [
    ("data.files=[a,b]", "data.files takes a mapping, not a list"),
    ("optim.decay_exclude={a: 1}", "optim.decay_exclude takes a list, not a mapping"),
    ("model=[1,2]", "model takes a mapping, not a list"),
])
def test_a_list_for_a_mapping_or_the_reverse_names_the_key(tmp_path, override, message):
  """OmegaConf's merge raised a bare TypeError ("Cannot merge incompatible container types")."""
  with pytest.raises(UserError, match=re.escape(f"override {override!r}: {message}")):
    config_lib.load_config(None, [override])
  recipe = tmp_path / "r.yaml"
  recipe.write_text("data: {files: [a, b]}\n")
  with pytest.raises(UserError, match=re.escape(f"config file {recipe}: data.files takes a mapping, not a list")):
    config_lib.load_config(str(recipe), [])


BASE = ["workdir=w", "data.file=f", "model.arch=fnn"]


@pytest.mark.parametrize("overrides,message", [
    (["data.batch_size=0"], "data.batch_size=0; must be positive"),
    (["train.steps=0"], "train.steps=0; must be positive"),
    (["optim.lr=0"], "optim.lr=0.0; must be > 0"),
    (["optim.b1=1.0"], r"optim.b1=1.0; must be in \[0, 1\)"),
    (["optim.ema_decay=1.0"], r"optim.ema_decay=1.0; must be in \[0, 1\)"),
    (["task.kind=classify", "task.max_len=128", "task.label_smoothing=1.0"],
     r"task.label_smoothing=1.0; must be in \[0, 1\)"),
    (["optim.plateau_factor=0"], r"optim.plateau_factor=0.0; must be in \(0, 1\]"),
    (["tokenizer.character_coverage=0"], r"tokenizer.character_coverage=0.0; must be in \(0, 1\]"),
    (["mesh.data=-2"], "mesh.data=-2; must be a positive size or -1"),
    (["mesh.tensor=-2"], "mesh.tensor=-2; must be a positive size or -1"),
    (["optim.name=adamw", "optim.weight_decay_mode=l2"], "optim.name=adamw has decoupled weight decay"),
    (["optim.lr=nan"], "optim.lr=nan; must be a finite number"),
    (["optim.weight_decay=inf"], "optim.weight_decay=inf; must be a finite number"),
    (["tokenizer.kind=char", f"tokenizer.include={__file__}"],
     "tokenizer.include is for tokenizer.kind=word, not 'char'"),
])
def test_numbers_outside_their_range_and_conflicting_settings_are_rejected(overrides, message):
  """Each range's ends as RANGES states them: a closed end is allowed (next test), an open one is not."""
  with pytest.raises(UserError, match=message):
    config_lib.load_config(None, BASE + overrides)


def test_the_closed_ends_of_the_ranges_are_allowed():
  cfg = config_lib.load_config(None, BASE + [
      "data.batch_size=1", "train.steps=1", "optim.lr=1e-12", "optim.b1=0.0", "optim.ema_decay=0.0",
      "optim.plateau_factor=1.0", "tokenizer.character_coverage=1.0", "mesh.data=-1", "optim.weight_decay=0",
      "optim.name=adam", "optim.weight_decay_mode=l2", "tokenizer.kind=word", f"tokenizer.include={__file__}"])
  assert (cfg.data.batch_size, cfg.optim.b1, cfg.optim.plateau_factor, cfg.mesh.data) == (1, 0.0, 1.0, -1)
  classify = ["task.kind=classify", "task.max_len=128"]
  assert config_lib.load_config(None, BASE + classify + ["task.label_smoothing=0.0"]).task.label_smoothing == 0.0


def test_model_vocab_size_may_exceed_the_tokenizers_but_not_fall_short():
  cfg = config_lib.load_config(None, BASE + ["model.vocab_size=64"])
  assert config_lib.model_config(cfg, vocab_size=64).vocab_size == 64
  assert config_lib.model_config(cfg, vocab_size=60).vocab_size == 64  # padded: allowed
  with pytest.raises(UserError, match="model.vocab_size=64 is smaller than the tokenizer's 65"):
    config_lib.model_config(cfg, vocab_size=65)
