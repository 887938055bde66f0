"""Tokenizers, corpus cache, Grain batching (windows and truncated-BPTT streams), TFDS sources."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from nlm_jax.config import DataConfig, TokenizerConfig
from nlm_jax.data import pipeline, tokenizers
from nlm_jax.data.corpus import Corpus
from nlm_jax.errors import UserError

TEXT = "the cat sat on the mat\nthe dog sat\n\nand then a bird flew over the mat\n"


# ----------------------------------------------------------------------------- tokenizers


def test_char_tokenizer_roundtrip_and_vocabulary():
  tok = tokenizers.CharTokenizer.train(TEXT)
  assert tok.chars == sorted(set(TEXT))
  ids = tok.encode(TEXT)
  assert ids.dtype == np.int32 and tok.decode(ids) == TEXT
  assert [tok.chars[i] for i in ids[:3]] == ["t", "h", "e"]
  with pytest.raises(UserError, match="'Z'"):
    tok.encode("Zoo")


def test_byte_tokenizer_covers_any_text():
  tok = tokenizers.ByteTokenizer()
  text = "naïve café ∑ 😀"
  ids = tok.encode(text)
  assert list(ids) == list(text.encode("utf-8")) and tok.decode(ids) == text
  assert tok.vocab_size == 259 and tok.start_id == 257


def test_char_tokenizer_starts_from_the_newline_id():
  """start_id (what an empty prompt starts from) is the id of '\\n', whatever it is; 0 without one."""
  tok = tokenizers.CharTokenizer.train("\tab\ncd\n")  # sorted: '\t' < '\n' < 'a' ...
  assert tok.chars[:2] == ["\t", "\n"] and tok.start_id == 1
  assert tokenizers.CharTokenizer.train("ba c").start_id == 0


def test_byte_tokenizer_decode_drops_the_special_ids():
  tok = tokenizers.ByteTokenizer()
  assert (tok.start_id, tok.vocab_size) == (257, 259)  # <pad> 256, <bos> 257, <eos> 258
  assert tok.decode([104, 256, 105, 257, 258]) == "hi"
  assert tok.decode([257] + list("é".encode("utf-8")) + [258]) == "é"


def test_word_tokenizer_follows_ptb_conventions():
  tok = tokenizers.WordTokenizer.train(TEXT)
  assert tok.words[:2] == ["<unk>", "<eos>"]
  assert tok.words[2] == "the"  # most frequent first
  ids = tok.encode(TEXT)
  n_lines = TEXT.count("\n")
  assert (ids == tok.eos_id).sum() == n_lines  # one <eos> per line, blank lines included
  assert len(ids) == len(TEXT.split()) + n_lines
  assert tok.decode(tok.encode("the cat\n")) == "the cat\n" and tok.decode(tok.encode(TEXT)) == TEXT
  small = tokenizers.WordTokenizer.train(TEXT, max_size=4)
  assert small.vocab_size == 4 and small.encode("zebra")[0] == small.unk_id
  rare = tokenizers.WordTokenizer.train(TEXT, min_count=2)
  assert "bird" not in rare.index and "mat" in rare.index


def test_word_tokenizer_include_keeps_every_word_of_the_task_text():
  task = "the zebra sat\nthe okapi\n"  # zebra, okapi: not in TEXT; sat, the: frequent there anyway
  tok = tokenizers.WordTokenizer.train(TEXT, max_size=6, include=task)
  # the included words first (by their count in the task text), then TEXT's most frequent others
  assert tok.words == ["<unk>", "<eos>", "the", "zebra", "sat", "okapi"]
  assert tok.encode("okapi mat")[1] == tok.unk_id  # mat (2nd most frequent in TEXT) was cut, okapi kept
  bigger = tokenizers.WordTokenizer.train(TEXT, max_size=8, include=task, min_count=2)
  assert bigger.words[6:] == ["mat"]  # min_count filters TEXT's words only ("sat" is already in)
  # without `include`: the vocabulary of before
  assert tokenizers.WordTokenizer.train(TEXT, include=None).words == tokenizers.WordTokenizer.train(TEXT).words
  with pytest.raises(UserError, match="tokenizer.include has 4 distinct words"):
    tokenizers.WordTokenizer.train(TEXT, max_size=5, include=task)


def test_sentencepiece_tokenizer_trains_and_roundtrips():
  text = "\n".join(f"the quick brown fox {i % 7} jumps over the lazy dog number {i}" for i in range(300)) + "\n"
  cfg = TokenizerConfig(kind="sentencepiece", vocab_size=60, model_type="bpe")
  tok = tokenizers.train_tokenizer(cfg, text)
  assert tok.vocab_size == 60
  line = "the lazy fox jumps over the quick dog"
  assert tok.decode(tok.encode(line + "\n")).strip() == line
  again = tokenizers.train_tokenizer(cfg, text)
  assert tokenizers.fingerprint(again) == tokenizers.fingerprint(tok)  # deterministic training


def test_sentencepiece_trains_on_lines_longer_than_its_default_limit():
  """SentencePiece skips lines over 4,192 bytes without a word: a text of long lines trained on
  part of itself, or (every line long) failed with 'INTERNAL: ... !sentences_.empty()'."""
  words = [f"w{i % 37}" for i in range(3000)]
  long_line = " ".join(words)  # ~11 kB
  tok = tokenizers.train_tokenizer(TokenizerConfig(kind="sentencepiece", vocab_size=40), long_line + "\n")
  assert tok.decode(tok.encode("w1 w2 w36\n")).strip() == "w1 w2 w36"
  assert len(tok.encode(long_line + "\n")) < 0.75 * len(long_line)  # merges were learned from it


@pytest.mark.parametrize("kind", ["char", "byte", "word"])
def test_tokenizer_save_load(tmp_path, kind):
  tok = tokenizers.train_tokenizer(TokenizerConfig(kind=kind), TEXT)
  tokenizers.save(tok, tmp_path / "t.json")
  back = tokenizers.load(tmp_path / "t.json")
  assert tokenizers.fingerprint(back) == tokenizers.fingerprint(tok)
  np.testing.assert_array_equal(back.encode(TEXT), tok.encode(TEXT))


# ----------------------------------------------------------------------------- corpus


def test_corpus_split_fractions_and_cache(tmp_path, monkeypatch):
  path = tmp_path / "c.txt"
  text = "".join(chr(ord("a") + i % 26) for i in range(1000))
  path.write_text(text)
  cfg = DataConfig(source="text", file=str(path), split_fractions=[0.9, 0.1], cache_dir=str(tmp_path / "cache"))
  corpus = Corpus(cfg, TokenizerConfig(kind="char"))
  train, val = corpus.tokens("train"), corpus.tokens("validation")
  assert len(train) == 900 and len(val) == 100  # nanoGPT's cut by characters
  assert corpus.tokenizer.decode(val) == text[900:]
  # A second corpus reads the cache: it never tokenizes or trains again.
  monkeypatch.setattr(tokenizers.CharTokenizer, "encode", lambda *a: pytest.fail("tokenized twice"))
  monkeypatch.setattr(tokenizers.CharTokenizer, "train", lambda *a: pytest.fail("trained twice"))
  again = Corpus(cfg, TokenizerConfig(kind="char"))
  np.testing.assert_array_equal(again.tokens("train"), train)
  assert len(os.listdir(tmp_path / "cache")) == 3  # tokenizer + two splits


@pytest.mark.parametrize("entry,damage", [("tokenizer", "cut"), ("tokens", "cut"), ("tokens", "overwritten")])
def test_a_damaged_cache_entry_is_made_again(tmp_path, capsys, entry, damage):
  """The cache is the corpus's, not the user's: an entry damaged from outside (writes are atomic) is
  rebuilt with a warning, never a traceback or advice about a run's checkpoints."""
  path = tmp_path / "c.txt"
  path.write_text(TEXT * 20)
  cfg = DataConfig(source="text", file=str(path), split_fractions=[0.9, 0.1], cache_dir=str(tmp_path / "cache"))
  first = Corpus(cfg, TokenizerConfig(kind="word"))
  want = first.tokens("train")
  damaged = next(p for p in (tmp_path / "cache").iterdir() if p.name.startswith(entry + "-"))
  data = damaged.read_bytes()
  # cut in half (np.load fails), or its last ids overwritten (it loads: ids outside the vocabulary)
  damaged.write_bytes(data[: len(data) // 2] if damage == "cut" else data[:-40] + b"\xff" * 40)
  capsys.readouterr()
  again = Corpus(cfg, TokenizerConfig(kind="word"))
  np.testing.assert_array_equal(again.tokens("train"), want)
  assert "unreadable" in capsys.readouterr().err
  np.testing.assert_array_equal(Corpus(cfg, TokenizerConfig(kind="word")).tokens("train"), want)  # rewritten
  assert "unreadable" not in capsys.readouterr().err


def test_corpus_tokenizer_cache_follows_the_include_file(tmp_path):
  """The cached vocabulary is keyed by what `tokenizer.include` holds, not only by its path."""
  (tmp_path / "c.txt").write_text(TEXT * 3)
  include = tmp_path / "task.txt"
  include.write_text("zebra\n")
  cfg = DataConfig(source="text", file=str(tmp_path / "c.txt"), split_fractions=[0.9, 0.1],
                   cache_dir=str(tmp_path / "cache"))
  tok_cfg = TokenizerConfig(kind="word", vocab_size=6, include=str(include))
  assert "zebra" in Corpus(cfg, tok_cfg).tokenizer.index
  include.write_text("okapi\n")
  words = Corpus(cfg, tok_cfg).tokenizer.index
  assert "okapi" in words and "zebra" not in words


def test_corpus_tokenizer_cache_follows_the_tokenizer_config(tmp_path):
  """One file, one cache, two tokenizer configs: two vocabularies, not the first one's twice."""
  (tmp_path / "c.txt").write_text(TEXT)
  cfg = DataConfig(source="text", files={"train": str(tmp_path / "c.txt")}, cache_dir=str(tmp_path / "cache"))
  every = Corpus(cfg, TokenizerConfig(kind="word", min_count=1)).tokenizer.index
  frequent = Corpus(cfg, TokenizerConfig(kind="word", min_count=2)).tokenizer.index
  assert "bird" in every and "bird" not in frequent and "mat" in frequent  # "bird" once, "mat" twice
  assert len(Corpus(cfg, TokenizerConfig(kind="word", vocab_size=4)).tokenizer.index) == 4


def test_corpus_tokens_cache_follows_the_tokenizer(tmp_path):
  """The same split tokenized by a character and then a byte tokenizer over one cache: each reads back
  its own ids (a character's id is a valid byte too, so a shared entry would load and decode wrongly)."""
  text = "naïve café\nthe cat sat\n" * 5
  (tmp_path / "c.txt").write_text(text)
  cfg = DataConfig(source="text", files={"train": str(tmp_path / "c.txt")}, cache_dir=str(tmp_path / "cache"))
  for kind in ("char", "byte", "char"):
    corpus = Corpus(cfg, TokenizerConfig(kind=kind))
    assert corpus.tokenizer.decode(corpus.tokens("train")) == text, kind


def test_corpus_split_cache_follows_the_split_fractions(tmp_path):
  path = tmp_path / "c.txt"
  text = "".join(chr(ord("a") + i % 26) for i in range(1000))
  path.write_text(text)
  for fractions, n_train in (([0.9, 0.1], 900), ([0.5, 0.5], 500), ([0.9, 0.1], 900)):
    cfg = DataConfig(source="text", file=str(path), split_fractions=fractions, cache_dir=str(tmp_path / "cache"))
    corpus = Corpus(cfg, TokenizerConfig(kind="char"))
    assert corpus.tokenizer.decode(corpus.tokens("train")) == text[:n_train]
    assert corpus.tokenizer.decode(corpus.tokens("validation")) == text[n_train:]


def test_a_cached_id_equal_to_the_vocabulary_size_is_rebuilt(tmp_path, capsys):
  """Ids run 0 .. V − 1: an entry holding V (one past the last id) is not of this vocabulary."""
  path = tmp_path / "c.txt"
  path.write_text(TEXT * 3)
  cfg = DataConfig(source="text", files={"train": str(path)}, cache_dir=str(tmp_path / "cache"))
  first = Corpus(cfg, TokenizerConfig(kind="char"))
  want = first.tokens("train")
  entry = next(p for p in (tmp_path / "cache").iterdir() if p.name.startswith("tokens-"))
  bad = want.copy()
  bad[-1] = first.tokenizer.vocab_size
  np.save(entry, bad)
  capsys.readouterr()
  np.testing.assert_array_equal(Corpus(cfg, TokenizerConfig(kind="char")).tokens("train"), want)
  assert "unreadable" in capsys.readouterr().err
  np.testing.assert_array_equal(np.load(entry), want)  # rewritten


def test_corpus_files_per_split(tmp_path):
  for name, text in (("train", "abcabc\n"), ("valid", "cab\n")):
    (tmp_path / f"{name}.txt").write_text(text * 10)
  cfg = DataConfig(source="text", files={"train": str(tmp_path / "train.txt"), "validation": str(tmp_path / "valid.txt")},
                   cache_dir=str(tmp_path / "cache"))
  corpus = Corpus(cfg, TokenizerConfig(kind="char"))
  assert corpus.tokenizer.decode(corpus.tokens("validation")) == "cab\n" * 10
  with pytest.raises(UserError, match="no split 'test'"):
    corpus.tokens("test")


# ----------------------------------------------------------------------------- batching


def test_random_windows_are_deterministic_shifted_and_cover_each_start_once_per_epoch():
  tokens = np.arange(103, dtype=np.int32)  # token value = position: windows reveal their starts
  B, T = 4, 8
  it = iter(pipeline.random_windows(tokens, B, T, seed=7))
  n_starts = len(tokens) - T
  starts = []
  for _ in range(n_starts // B):
    batch = next(it)
    np.testing.assert_array_equal(batch["targets"], batch["inputs"] + 1)
    assert (np.diff(batch["inputs"], axis=1) == 1).all()
    starts.extend(batch["inputs"][:, 0])
  assert len(set(starts)) == len(starts)  # without replacement within an epoch
  again = iter(pipeline.random_windows(tokens, B, T, seed=7))
  np.testing.assert_array_equal(next(again)["inputs"], np.asarray(starts[:B])[:, None] + np.arange(T))
  other = next(iter(pipeline.random_windows(tokens, B, T, seed=8)))
  assert not np.array_equal(other["inputs"][:, 0], np.asarray(starts[:B]))


def test_random_windows_reshuffle_every_epoch():
  """Each epoch's starts are a permutation of all N − T starts, in a new order each epoch."""
  tokens = np.arange(108, dtype=np.int32)  # 100 starts: 25 batches of 4 per epoch, none across epochs
  B, T = 4, 8
  it = iter(pipeline.random_windows(tokens, B, T, seed=7))
  starts = np.concatenate([next(it)["inputs"][:, 0] for _ in range(3 * 100 // B)])
  epochs = starts.reshape(3, 100)
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(100))
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
  assert not np.array_equal(epochs[0], epochs[2])


def test_streams_continue_row_by_row_and_reset_each_epoch():
  tokens = np.arange(1 + 4 * 30, dtype=np.int32)
  B, T = 4, 8
  it = iter(pipeline.contiguous_streams(tokens, B, T))
  batches = [next(it) for _ in range(4)]  # 30 // 8 = 3 chunks per epoch, then a new epoch
  L = 30
  for k in range(3):
    np.testing.assert_array_equal(batches[k]["inputs"], np.arange(B)[:, None] * L + k * T + np.arange(T))
    np.testing.assert_array_equal(batches[k]["targets"], batches[k]["inputs"] + 1)
  assert [bool(b["reset"][0]) for b in batches] == [True, False, False, True]
  np.testing.assert_array_equal(batches[3]["inputs"], batches[0]["inputs"])


def test_iterator_state_resumes_exactly():
  tokens = np.arange(500, dtype=np.int32)
  it = iter(pipeline.random_windows(tokens, 4, 8, seed=1))
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it)["inputs"] for _ in range(3)]
  fresh = iter(pipeline.random_windows(tokens, 4, 8, seed=1))
  fresh.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(next(fresh)["inputs"], e)


def test_process_rows_split_the_global_batch():
  tokens = np.arange(500, dtype=np.int32)
  full = next(iter(pipeline.random_windows(tokens, 4, 8, seed=1)))
  top = next(iter(pipeline.random_windows(tokens, 4, 8, seed=1, rows=slice(0, 2))))
  bottom = next(iter(pipeline.random_windows(tokens, 4, 8, seed=1, rows=slice(2, 4))))
  np.testing.assert_array_equal(np.concatenate([top["inputs"], bottom["inputs"]]), full["inputs"])


@pytest.mark.parametrize("batching", ["windows", "streams"])
@pytest.mark.parametrize("n_tokens,batch_size", [(98, 3), (97, 3), (100, 4), (10, 4), (3, 4)])
def test_full_evaluation_scores_every_token_once(batching, n_tokens, batch_size):
  tokens = np.arange(1, n_tokens + 1, dtype=np.int32)  # token value = position + 1
  batches = list(pipeline.eval_batches(tokens, batching, batch_size=batch_size, seq_len=8))
  count, whole = pipeline.eval_batch_count(len(tokens), batching, batch_size, 8)
  assert len(batches) == count and whole
  scored = np.concatenate([b["targets"][b["mask"] > 0] for b in batches])
  np.testing.assert_array_equal(np.sort(scored), tokens[1:])  # each target once, none dropped
  for b in batches:
    assert b["inputs"].shape == b["targets"].shape == b["mask"].shape == (batch_size, 8)
    np.testing.assert_array_equal((b["targets"] - b["inputs"])[b["mask"] > 0], 1)
  if batching == "streams":  # row b of batch k+1 continues row b of batch k
    rows = np.concatenate([b["inputs"] for b in batches], axis=1)
    mask = np.concatenate([b["mask"] for b in batches], axis=1) > 0
    for row, m in zip(rows, mask):
      assert (np.diff(row[m]) == 1).all()


@pytest.mark.parametrize("batching,max_batches", [("windows", None), ("windows", 3), ("streams", None)])
def test_evaluation_batches_padded_for_the_mesh_are_the_same_batches_and_mask_0_rows(batching, max_batches):
  """pad_to: each batch gets rows of mask 0 after the batch_size rows of data, which are what they
  are without it (the streams' layout, the random windows drawn), so devices do not change them."""
  tokens = np.arange(1, 200, dtype=np.int32)
  plain = list(pipeline.eval_batches(tokens, batching, 3, 8, max_batches, seed=1))
  padded = list(pipeline.eval_batches(tokens, batching, 3, 8, max_batches, seed=1, pad_to=8))
  assert len(plain) == len(padded) > 0
  for a, b in zip(plain, padded):
    assert b["inputs"].shape == (8, 8) and b["reset"].shape == (8,)
    for key in ("inputs", "targets", "mask"):
      np.testing.assert_array_equal(b[key][:3], a[key])
    assert not b["mask"][3:].any()
  halves = [list(pipeline.eval_batches(tokens, batching, 3, 8, max_batches, seed=1, pad_to=8, rows=r))
            for r in (slice(0, 4), slice(4, 8))]
  for whole, top, bottom in zip(padded, *halves):
    np.testing.assert_array_equal(np.concatenate([top["inputs"], bottom["inputs"]]), whole["inputs"])


def test_estimates_count_their_batches_and_are_never_the_whole_split():
  tokens = np.arange(200, dtype=np.int32)
  assert pipeline.eval_batch_count(200, "windows", 4, 8, max_batches=3) == (3, False)
  assert pipeline.eval_batch_count(200, "streams", 4, 8, max_batches=3) == (3, False)
  assert pipeline.eval_batch_count(200, "streams", 4, 8, max_batches=99) == (7, True)  # ⌈⌈199/4⌉/8⌉
  a = list(pipeline.eval_batches(tokens, "windows", 4, 8, max_batches=3, seed=1))
  b = list(pipeline.eval_batches(tokens, "windows", 4, 8, max_batches=3, seed=1))
  c = list(pipeline.eval_batches(tokens, "windows", 4, 8, max_batches=3, seed=2))
  assert len(a) == 3 and all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, b))
  assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])


def test_estimate_batches_are_different_windows():
  """An estimate of max_batches batches reads max_batches·B distinct random windows (without
  replacement across its batches), each a contiguous, shifted window."""
  tokens = np.arange(200, dtype=np.int32)  # token value = position
  B, T = 4, 8
  batches = list(pipeline.eval_batches(tokens, "windows", B, T, max_batches=3, seed=1))
  assert len(batches) == 3
  starts = np.concatenate([b["inputs"][:, 0] for b in batches])
  assert len(set(starts.tolist())) == 3 * B and starts.max() <= len(tokens) - T - 1
  for b in batches:
    np.testing.assert_array_equal(b["inputs"], b["inputs"][:, :1] + np.arange(T))
    np.testing.assert_array_equal(b["targets"], b["inputs"] + 1)


# ----------------------------------------------------------------------------- TFDS


def _register_tiny_tfds(text_lines):
  import tensorflow_datasets as tfds

  class NlmJaxTinyText(tfds.core.GeneratorBasedBuilder):
    """A one-example-per-split text dataset, generated in the test (like tiny_shakespeare)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(text_lines[:-5]),
              "validation": self._generate_examples(text_lines[-5:])}

    def _generate_examples(self, lines):
      yield 0, {"text": "\n".join(lines)}

  return NlmJaxTinyText


def test_tfds_source_prepared_offline(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  from nlm_jax.data.corpus import prepare_tfds

  lines = [f"line {i} of a tiny dataset" for i in range(40)]
  builder_cls = _register_tiny_tfds(lines)
  data_dir = str(tmp_path / "tfds")
  cfg = DataConfig(source="tfds", name=builder_cls.name, data_dir=data_dir, cache_dir=str(tmp_path / "cache"))
  with pytest.raises(UserError, match=f"data prepare {builder_cls.name}"):
    Corpus(cfg, TokenizerConfig(kind="char"))
  prepare_tfds(builder_cls.name, None, data_dir)
  corpus = Corpus(cfg, TokenizerConfig(kind="char"))
  assert corpus.tokenizer.decode(corpus.tokens("validation")) == "\n".join(lines[-5:])
  assert corpus.tokenizer.decode(corpus.tokens("train")) == "\n".join(lines[:-5])


def test_prepare_with_a_manual_dir_that_lacks_the_files_and_no_network(tmp_path, monkeypatch):
  """It retried the network for minutes (only a missing --manual-dir was checked first)."""
  pytest.importorskip("tensorflow_datasets")
  from nlm_jax.data import corpus as corpus_lib

  monkeypatch.setattr(corpus_lib, "_network_reachable", lambda urls: False)
  (tmp_path / "manual").mkdir()
  (tmp_path / "manual" / "other.txt").write_text("not the file\n")
  with pytest.raises(UserError, match="lacks input.txt"):
    corpus_lib.prepare_tfds("tiny_shakespeare", str(tmp_path / "manual"), str(tmp_path / "tfds"))


@pytest.mark.parametrize("kind", ["char", "byte", "word"])
def test_tokenizing_in_chunks_of_lines_gives_the_same_ids(tmp_path, kind):
  """The corpus tokenizes a chunk of whole lines at a time (so that a bar can follow it)."""
  text = "".join(f"line {i} of the naïve text\n" if i % 7 else "\n" for i in range(200)) + "no newline at the end"
  path = tmp_path / "t.txt"
  path.write_text(text, encoding="utf-8")
  corpus = Corpus(DataConfig(source="text", files={"train": str(path)}, cache_dir=str(tmp_path / "cache")),
                  TokenizerConfig(kind=kind))
  np.testing.assert_array_equal(corpus._encode(text, "train", chunk_chars=50), corpus.tokenizer.encode(text))
  np.testing.assert_array_equal(corpus.tokens("train"), corpus.tokenizer.encode(text))


def _pad_to_longest(lengths):
  """A collate: each chosen example a row of its index, padded (-1) to the batch's longest."""
  def collate(chosen):
    T = int(max(lengths[chosen]))
    ids = np.full((len(chosen), T), -1)
    for b, i in enumerate(chosen):
      ids[b, :lengths[i]] = i
    return {"ids": ids}
  return collate


def test_length_bucketed_gives_every_process_its_rows_of_the_global_batch():
  """Each process's part of a training batch is its rows of the batch all processes make together,
  padded to the whole batch's longest example (the parts of a global array must agree in shape)."""
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 60, 300)
  halves = [iter(pipeline.length_bucketed(lengths, 16, 3, rows, _pad_to_longest(lengths)))
            for rows in (slice(0, 8), slice(8, 16))]
  whole = iter(pipeline.length_bucketed(lengths, 16, 3, slice(None), _pad_to_longest(lengths)))
  for _ in range(60):
    a, b, full = next(halves[0])["ids"], next(halves[1])["ids"], next(whole)["ids"]
    np.testing.assert_array_equal(np.concatenate([a, b]), full)


def test_length_bucketed_reads_every_example_even_the_longest():
  """The n mod batch_size examples an epoch leaves out are random ones, not the longest of a set
  smaller than one sort chunk (which were then never read); within an epoch none repeats."""
  lengths = np.arange(1, 101)  # 100 examples, batches of 16: 4 left out per epoch
  batches = iter(pipeline.length_bucketed(lengths, 16, 0, slice(None), _pad_to_longest(lengths)))
  epochs = [np.concatenate([next(batches)["ids"].max(1) for _ in range(6)]) for _ in range(8)]
  assert all(len(set(e)) == 96 for e in epochs)
  assert set(np.concatenate(epochs)) == set(range(100))


def test_a_byte_order_mark_is_not_text(tmp_path):
  """A leading UTF-8 byte-order mark (Notepad, Excel) is dropped: it would be a character of the
  vocabulary and the first token, and it hid a TSV's header (no column 'sentence' in '\\ufeffsentence')."""
  from nlm_jax.data.files import read_text
  from nlm_jax.tasks.classify import read_tsv

  plain, marked = tmp_path / "plain.tsv", tmp_path / "marked.tsv"
  plain.write_bytes("sentence\tlabel\nfine film\t1\n".encode())
  marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
  assert read_text(str(marked)) == read_text(str(plain)) == "sentence\tlabel\nfine film\t1\n"
  assert read_tsv(str(marked), "sentence", "label") == (["fine film"], ["1"])
  inner = tmp_path / "inner.txt"  # only a leading mark is one; a U+FEFF inside is text
  inner.write_bytes("a\ufeffb".encode())
  assert read_text(str(inner)) == "a\ufeffb"


def test_read_text_names_the_first_bad_byte_and_a_directory(tmp_path):
  """The error gives the 0-based offset of the first byte that is not UTF-8, and the byte; a directory
  is a one-line UserError too, not an IsADirectoryError."""
  from nlm_jax.data.files import read_text

  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"ab\xff")
  with pytest.raises(UserError, match=r"is not valid UTF-8 \(byte 2: b'\\xff'\)"):
    read_text(str(bad))
  bad.write_bytes("é\n".encode() + b"x\xc3(")  # offset in bytes, not characters: é is two
  with pytest.raises(UserError, match=r"\(byte 4: b'\\xc3'\)"):
    read_text(str(bad))
  with pytest.raises(UserError, match="tokenizer.include is a directory: " + re.escape(str(tmp_path)) + "$"):
    read_text(str(tmp_path), "tokenizer.include")
