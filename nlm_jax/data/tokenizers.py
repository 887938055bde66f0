"""Tokenizers: text ↔ int32 ids. Char and word vocabularies come from the training split;
SentencePiece (BPE or unigram) is trained on it; bytes need no training.

Each tokenizer round-trips through `to_dict` / `from_dict` (JSON), which is how a run directory
and a checkpoint keep the exact vocabulary that training used.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import io
import json
import os
from typing import Any, Iterable, Protocol

import numpy as np

from nlm_jax.data.files import read_text
from nlm_jax.errors import UserError


class Tokenizer(Protocol):
  kind: str
  vocab_size: int
  start_id: int  # what an empty prompt starts from

  def encode(self, text: str) -> np.ndarray: ...
  def decode(self, ids: Iterable[int]) -> str: ...
  def to_dict(self) -> dict[str, Any]: ...


def fingerprint(tokenizer: Tokenizer) -> str:
  """A hash of the vocabulary: equal fingerprints encode every text identically."""
  return hashlib.sha256(json.dumps(tokenizer.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _lines(text: str) -> list[str]:
  """Lines split on '\\n' only, without the empty string after a final newline."""
  lines = text.split("\n")
  return lines[:-1] if lines and lines[-1] == "" else lines


class CharTokenizer:
  """One id per character; the vocabulary is the sorted set of the training split's characters."""

  kind = "char"

  def __init__(self, chars: list[str]):
    self.chars = list(chars)
    self._codes = np.array([ord(c) for c in self.chars], np.int64)  # sorted: searchsorted maps
    self.vocab_size = len(self.chars)
    self.start_id = self.chars.index("\n") if "\n" in self.chars else 0

  @classmethod
  def train(cls, text: str) -> "CharTokenizer":
    return cls(sorted(set(text)))

  def encode(self, text: str) -> np.ndarray:
    codes = np.frombuffer(text.encode("utf-32-le"), np.uint32).astype(np.int64)
    ids = np.searchsorted(self._codes, codes)
    bad = (ids >= len(self._codes)) | (self._codes[np.minimum(ids, len(self._codes) - 1)] != codes)
    if bad.any():
      c = chr(codes[np.argmax(bad)])
      raise UserError(f"character {c!r} is not in the char vocabulary of the training split "
                      "(use tokenizer.kind=byte to cover any text)")
    return ids.astype(np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    return "".join(self.chars[i] for i in ids)

  def to_dict(self) -> dict[str, Any]:
    return {"kind": self.kind, "chars": self.chars}


class ByteTokenizer:
  """UTF-8 bytes 0..255, then the specials <pad> 256, <bos> 257, <eos> 258."""

  kind = "byte"
  SPECIALS = ("<pad>", "<bos>", "<eos>")

  def __init__(self):
    self.vocab_size = 256 + len(self.SPECIALS)
    self.start_id = 256 + self.SPECIALS.index("<bos>")

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

  def to_dict(self) -> dict[str, Any]:
    return {"kind": self.kind}


class WordTokenizer:
  """Whitespace-separated words, `<eos>` at each line end (the PTB/WikiText convention).

  Vocabulary: `<unk>`, `<eos>`, then training-split words by decreasing count (ties: first
  appearance), at most `max_size` in all, each seen at least `min_count` times. `include`, a text
  whose every word must be in the vocabulary (a downstream task's training text, when the
  vocabulary of a language model pretrained on other text is cut to the most frequent words),
  puts its words first (by their count there), whatever their count in the training split.
  """

  kind = "word"
  UNK, EOS = "<unk>", "<eos>"

  def __init__(self, words: list[str]):
    self.words = list(words)
    self.index = {w: i for i, w in enumerate(self.words)}
    self.vocab_size = len(self.words)
    self.unk_id, self.eos_id = self.index[self.UNK], self.index[self.EOS]
    self.start_id = self.eos_id

  @classmethod
  def train(cls, text: str, max_size: int | None = None, min_count: int = 1,
            include: str | None = None) -> "WordTokenizer":
    specials = [cls.UNK, cls.EOS]

    def ranked(text: str, least: int) -> list[str]:
      counts = collections.Counter()
      for line in _lines(text):
        counts.update(line.split())
      # Counter keeps first-appearance order, and sorted() is stable: ties stay in that order.
      return [w for w, c in sorted(counts.items(), key=lambda wc: -wc[1]) if c >= least and w not in specials]

    required = ranked(include, 1) if include is not None else []
    if max_size is not None and len(specials) + len(required) > max_size:
      raise UserError(f"tokenizer.include has {len(required)} distinct words: more than tokenizer.vocab_size="
                      f"{max_size} holds with <unk> and <eos>")
    kept = set(required)
    words = required + [w for w in ranked(text, min_count) if w not in kept]
    if max_size is not None:
      words = words[: max(0, max_size - len(specials))]
    return cls(specials + words)

  def encode(self, text: str) -> np.ndarray:
    get, unk, eos = self.index.get, self.unk_id, self.eos_id
    ids: list[int] = []
    for line in _lines(text):
      ids.extend(get(w, unk) for w in line.split())
      ids.append(eos)
    return np.asarray(ids, np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    """Words joined by single spaces, a newline for each `<eos>`: decode(encode(text)) is the text
    with its whitespace normalized, and decoding a longer sequence extends the shorter one's text."""
    out: list[str] = []
    for i in ids:
      if i == self.eos_id:
        out.append("\n")
      else:
        if out and out[-1] != "\n":
          out.append(" ")
        out.append(self.words[i])
    return "".join(out)

  def to_dict(self) -> dict[str, Any]:
    return {"kind": self.kind, "words": self.words}


class SentencePieceTokenizer:
  """SentencePiece (BPE or unigram) trained on the training split's lines; `</s>` ends each line."""

  kind = "sentencepiece"

  def __init__(self, model_proto: bytes):
    import sentencepiece as spm

    self.model_proto = model_proto
    self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self.sp.get_piece_size()
    self.eos_id = self.sp.eos_id()
    self.start_id = self.sp.bos_id()
    self.unk_id = self.sp.unk_id()

  @classmethod
  def train(cls, text: str, vocab_size: int, model_type: str = "bpe",
            character_coverage: float = 1.0) -> "SentencePieceTokenizer":
    import sentencepiece as spm

    model = io.BytesIO()
    lines = [line for line in _lines(text) if line.strip()]
    # SentencePiece skips, silently, every line longer than max_sentence_length (4,192 bytes by
    # default): a text of long lines trained on part of itself, or on nothing
    longest = max((len(line.encode("utf-8")) for line in lines), default=0)
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
          model_type=model_type, character_coverage=character_coverage, num_threads=1,
          shuffle_input_sentence=False, input_sentence_size=0, minloglevel=2,
          hard_vocab_limit=True, max_sentence_length=max(4192, longest))
    except RuntimeError as e:
      raise UserError(f"sentencepiece training failed: {str(e).splitlines()[0]}") from None
    return cls(model.getvalue())

  def encode(self, text: str) -> np.ndarray:
    pieces = self.sp.encode(_lines(text))
    ids: list[int] = []
    for line_ids in pieces:
      ids.extend(line_ids)
      ids.append(self.eos_id)
    return np.asarray(ids, np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    lines, current = [], []
    for i in ids:
      if i == self.eos_id:
        lines.append(self.sp.decode(current))
        current = []
      else:
        current.append(int(i))
    return "\n".join(lines + ([self.sp.decode(current)] if current else [""] if lines else []))

  def to_dict(self) -> dict[str, Any]:
    return {"kind": self.kind, "model": base64.b64encode(self.model_proto).decode("ascii")}


def read_include(path: str) -> str:
  """The text of `tokenizer.include`, or a one-line error naming what is wrong with the file."""
  text = read_text(path, "tokenizer.include file")
  if not text.split():
    raise UserError(f"tokenizer.include file {path} has no words")
  return text


def train_tokenizer(cfg, text: str, include: str | None = None) -> Tokenizer:
  """A tokenizer of kind `cfg.kind` (a `TokenizerConfig`) fitted to the training text. `include`:
  the text of `cfg.include` when the caller has read it already (read here otherwise)."""
  if cfg.kind == "char":
    return CharTokenizer.train(text)
  if cfg.kind == "byte":
    return ByteTokenizer()
  if cfg.kind == "word":
    if include is None and cfg.include is not None:
      include = read_include(cfg.include)
    return WordTokenizer.train(text, cfg.vocab_size, cfg.min_count, include)
  if cfg.kind == "sentencepiece":
    return SentencePieceTokenizer.train(text, cfg.vocab_size, cfg.model_type, cfg.character_coverage)
  raise UserError(f"config: tokenizer.kind={cfg.kind!r}; allowed: char, byte, word, sentencepiece")


def from_dict(d: dict[str, Any]) -> Tokenizer:
  kind = d.get("kind")
  if kind == "char":
    return CharTokenizer(d["chars"])
  if kind == "byte":
    return ByteTokenizer()
  if kind == "word":
    return WordTokenizer(d["words"])
  if kind == "sentencepiece":
    return SentencePieceTokenizer(base64.b64decode(d["model"]))
  raise UserError(f"unknown tokenizer kind {kind!r} in saved tokenizer")


def save(tokenizer: Tokenizer, path: str) -> None:
  """Written to a temporary file and renamed: an interrupted save leaves the previous file."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(tokenizer.to_dict(), f, ensure_ascii=False)
  os.replace(tmp, path)


def load(path: str) -> Tokenizer:
  try:
    with open(path, encoding="utf-8") as f:
      return from_dict(json.load(f))
  except FileNotFoundError:
    raise UserError(f"tokenizer file not found: {path}") from None
  # not JSON, not a tokenizer's, or (RuntimeError) a sentencepiece model its library cannot parse
  except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
    raise UserError(f"tokenizer file {path} is damaged ({type(e).__name__}: {str(e)[:100]}); restore it "
                    "from checkpoints/<step>/tokenizer or retrain") from None
