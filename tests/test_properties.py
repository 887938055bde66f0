"""Property-based tests (hypothesis): any key=value override gives a valid config or one UserError,
never another exception; the tokenizers' encode/decode round trips on arbitrary text."""

from __future__ import annotations

import dataclasses
import typing

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from nlm_jax import config as config_lib
from nlm_jax import models
from nlm_jax.data import tokenizers
from nlm_jax.errors import UserError
from nlm_jax.training import optim

# derandomize: CI runs the same examples every time (a CI run of 2026-11-26 drew model.arch=[],
# a TypeError since fixed, that earlier runs had not drawn); the explicit cases below keep it.
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


def _keys(cls, prefix: str = "") -> list[str]:
  hints = typing.get_type_hints(cls)
  out = []
  for f in dataclasses.fields(cls):
    if dataclasses.is_dataclass(hints[f.name]):
      out += _keys(hints[f.name], prefix + f.name + ".")
    elif f.name != "model":
      out.append(prefix + f.name)
  return out


KEYS = sorted(set(_keys(config_lib.Config))
              | {f"model.{f.name}" for cfg in models.CONFIGS.values() for f in dataclasses.fields(cfg)}
              | {"model.arch", "train.stpes", "optim", "data.files.train", "model.nope"})
VALUES = st.one_of(
    st.integers(min_value=-3, max_value=2**40).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["null", "true", "false", "", "[]", "{}", "[1, 2]", "fnn", "lstm", "rnn", "transformer",
                     "windows", "streams", "char", "word", "adamw", "sgd", "warmup_cosine", "0", "1", "-1",
                     "1e9", "nan", "inf", "-inf", "'", "[", "{a: 1}", "a: b", "${x}", "???"]),
    st.text(max_size=12),
)
BASE = ["workdir=/tmp/never-created", "data.file=/tmp/corpus.txt", "model.arch=transformer", "model.d_model=16",
        "model.n_heads=2", "model.n_layers=1", "model.context=16"]


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=4))
@example([("model.arch", "[]")])
@example([("model.arch", "{a: 1}"), ("model.d_model", "[1, 2]")])
def test_any_override_gives_a_valid_config_or_one_user_error(pairs):
  overrides = BASE + [f"{k}={v}" for k, v in pairs]
  try:
    cfg = config_lib.load_config(None, overrides)
  except UserError as e:
    assert str(e) and "\n" not in str(e).strip(), str(e)
    return
  # A config that loads builds: its model, optimizer and schedule.
  model_cfg = config_lib.model_config(cfg, vocab_size=50)
  models.build(model_cfg)
  optim.make_optimizer(cfg.optim, cfg.train.steps)
  assert np.isfinite(float(optim.schedule(cfg.optim, cfg.train.steps)(0)))
  assert config_lib.from_dict(config_lib.to_dict(cfg)) == cfg


TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)


@SETTINGS
@given(TEXT)
def test_byte_tokenizer_round_trips_any_text(text):
  tok = tokenizers.ByteTokenizer()
  assert tok.decode(tok.encode(text)) == text


@SETTINGS
@given(TEXT, st.data())
def test_char_tokenizer_round_trips_text_over_its_vocabulary(text, data):
  tok = tokenizers.from_dict(tokenizers.CharTokenizer.train(text + "x").to_dict())  # and through its JSON
  assert tok.decode(tok.encode(text)) == text
  other = data.draw(st.text(st.sampled_from(tok.chars), max_size=50))
  assert tok.decode(tok.encode(other)) == other


@SETTINGS
@given(TEXT)
def test_word_tokenizer_round_trips_its_ids_and_keeps_the_words(text):
  # A literal "<eos>" in the text is the end-of-line token by the WikiText convention (decoded as a
  # newline), so the words are compared with it read that way.
  text = text.replace(tokenizers.WordTokenizer.EOS, "\n")
  tok = tokenizers.WordTokenizer.train(text)
  ids = tok.encode(text)
  decoded = tok.decode(ids)
  np.testing.assert_array_equal(tok.encode(decoded), ids)
  assert decoded.split() == text.split()  # the words, in order
  assert decoded.count("\n") == len(tokenizers._lines(text))  # one <eos> per line


@pytest.fixture(scope="module")
def spm_tokenizer():
  pytest.importorskip("sentencepiece")
  text = "\n".join(f"the {a} {b} sat on a {c} mat" for a in ("big", "red", "small") for b in ("cat", "dog")
                   for c in ("blue", "green", "red")) * 3
  return tokenizers.SentencePieceTokenizer.train(text, vocab_size=40)


@SETTINGS
@given(st.lists(st.sampled_from(["the", "big", "red", "cat", "dog", "sat", "on", "a", "mat", "blue", "\n"]),
                max_size=30))
def test_sentencepiece_round_trips_text_of_its_words(spm_tokenizer, words):
  text = " ".join(words).replace(" \n ", "\n").strip(" ")
  tok = spm_tokenizer
  ids = tok.encode(text)
  np.testing.assert_array_equal(tok.encode(tok.decode(ids)), ids)
