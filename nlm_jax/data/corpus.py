"""Text sources (TFDS datasets, local files) and the on-disk cache of tokenized splits.

    corpus = Corpus(cfg.data, cfg.tokenizer)       # tokenizer trained on the training split,
    ids = corpus.tokens("validation")               # or taken from a run directory
    corpus.tokenizer.decode(ids[:100])

The cache (`data.cache_dir`, `$NLM_JAX_CACHE` or `~/.cache/nlm-jax`) is keyed by the source
and the tokenizer, so a second run reads int32 arrays instead of tokenizing again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Optional

import numpy as np

from nlm_jax import progress
from nlm_jax.data import tokenizers
from nlm_jax.data.files import read_text
from nlm_jax.errors import UserError, warn

SPLIT_NAMES = ("train", "validation", "test")


def _digest(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


# ----------------------------------------------------------------------------- local text


class TextSource:
  """A file per split (`data.files`), or one file cut by `data.split_fractions` (by characters,
  as nanoGPT cuts Tiny Shakespeare 90/10) into train / validation [/ test]."""

  def __init__(self, cfg):
    self.cfg = cfg
    if cfg.files:
      self.paths = {split: os.path.abspath(os.path.expanduser(p)) for split, p in cfg.files.items()}
    else:
      fractions = list(cfg.split_fractions)
      if not (2 <= len(fractions) <= 3) or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise UserError(f"config: data.split_fractions={fractions}; need 2 or 3 positive fractions summing to 1")
      self.paths = {split: os.path.abspath(os.path.expanduser(cfg.file)) for split in SPLIT_NAMES[:len(fractions)]}

  @property
  def splits(self) -> list[str]:
    return list(self.paths)

  def identity(self, split: str) -> dict:
    path = self._path(split)
    try:
      st = os.stat(path)
    except FileNotFoundError:
      raise UserError(f"data file not found: {path}") from None
    ident = {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "split": split}
    if not self.cfg.files:
      ident["fractions"] = list(self.cfg.split_fractions)
    return ident

  def _path(self, split: str) -> str:
    if split not in self.paths:
      raise UserError(f"no split {split!r} in the text source; available: {', '.join(self.paths)}")
    return self.paths[split]

  def text(self, split: str) -> str:
    text = read_text(self._path(split))
    if self.cfg.files:
      return text
    bounds = np.concatenate([[0], np.cumsum(self.cfg.split_fractions)])
    i = SPLIT_NAMES.index(split)
    n = len(text)
    return text[int(n * bounds[i]) : int(n * bounds[i + 1]) if i + 1 < len(bounds) - 1 else n]


# ----------------------------------------------------------------------------- TFDS


def tfds_builder(name: str, data_dir: Optional[str]):
  """The TFDS builder of `name`, or a UserError if TFDS does not know the name."""
  import tensorflow_datasets as tfds

  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(f"unknown TFDS dataset {name!r} (see tfds.list_builders())") from None


class TFDSSource:
  """A TFDS dataset prepared as ArrayRecord, read with `tfds.data_source` (random access).
  The text feature of each example is decoded as UTF-8; examples are joined by newlines."""

  progress = False  # a bar while reading (Corpus sets it)

  def __init__(self, cfg):
    self.cfg = cfg
    self.builder = tfds_builder(cfg.name, cfg.data_dir)
    if not self.builder.is_prepared():
      raise UserError(
          f"TFDS dataset {cfg.name!r} is not prepared in {self.builder.data_dir}; this machine may "
          f"have no network: run `nlm-jax data prepare {cfg.name} --manual-dir DIR"
          + (f" --data-dir {cfg.data_dir}" if cfg.data_dir else "") + "` first")

  @property
  def splits(self) -> list[str]:
    return list(self.builder.info.splits.keys())

  def identity(self, split: str) -> dict:
    self._check(split)
    return {"tfds": self.cfg.name, "version": str(self.builder.info.version),
            "data_dir": os.path.abspath(self.builder.data_dir), "split": split,
            "feature": self.cfg.text_feature, "max_examples": self.cfg.max_examples}

  def _check(self, split: str):
    if split not in self.splits:
      raise UserError(f"TFDS dataset {self.cfg.name!r} has no split {split!r}; available: {', '.join(self.splits)}")

  def text(self, split: str) -> str:
    import tensorflow_datasets as tfds

    self._check(split)
    source = tfds.data_source(self.cfg.name, split=split, data_dir=self.cfg.data_dir,
                              builder_kwargs=None)
    n = len(source) if self.cfg.max_examples is None else min(len(source), self.cfg.max_examples)
    parts = []
    for i in progress.bar(self.progress, range(n), desc=f"read {self.cfg.name} {split}", unit="example"):
      example = source[i]
      if self.cfg.text_feature not in example:
        raise UserError(f"TFDS dataset {self.cfg.name!r} has no feature {self.cfg.text_feature!r}; "
                        f"features: {', '.join(example)} (set data.text_feature)")
      value = example[self.cfg.text_feature]
      parts.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
    return "\n".join(parts)


def tfds_fields(data_cfg, split: str, fields: list[str], what: dict[str, str]) -> list[list]:
  """The values of `fields` in every example of a prepared TFDS split (the first
  `data_cfg.max_examples`), one list per field; text is decoded from UTF-8. `what` names the
  config key that chose each field, for the error when the dataset has no such feature."""
  import tensorflow_datasets as tfds

  builder = tfds_builder(data_cfg.name, data_cfg.data_dir)
  if not builder.is_prepared():
    raise UserError(f"TFDS dataset {data_cfg.name!r} is not prepared in {builder.data_dir}; run "
                    f"`nlm-jax data prepare {data_cfg.name}` first")
  if split not in builder.info.splits:
    raise UserError(f"TFDS dataset {data_cfg.name!r} has no split {split!r}; available: "
                    f"{', '.join(builder.info.splits.keys())}")
  source = tfds.data_source(data_cfg.name, split=split, data_dir=data_cfg.data_dir)
  n = len(source) if data_cfg.max_examples is None else min(len(source), data_cfg.max_examples)
  columns: list[list] = [[] for _ in fields]
  for i in range(n):
    example = source[i]
    for column, field in zip(columns, fields):
      if field not in example:
        raise UserError(f"TFDS dataset {data_cfg.name!r} has no feature {field!r} ({what[field]}); features: "
                        f"{', '.join(example)}")
      value = example[field]
      column.append(value.decode("utf-8") if isinstance(value, bytes) else value)
  return columns


def prepare_tfds(name: str, manual_dir: Optional[str], data_dir: Optional[str]) -> str:
  """Downloads (or reads from `manual_dir`) and prepares a TFDS dataset as ArrayRecord."""
  import tensorflow_datasets as tfds

  builder = tfds_builder(name, data_dir)
  if manual_dir is not None and not os.path.isdir(manual_dir):
    raise UserError(f"manual dir not found: {manual_dir}")
  infos = getattr(builder, "url_infos", None) or {}
  urls = list(infos)
  if urls and not builder.is_prepared():
    # TFDS takes a download from manual_dir only under its checksum file's name for the URL
    missing = [] if manual_dir is None else [
        getattr(info, "filename", None) or url for url, info in infos.items()
        if not (getattr(info, "filename", None) and os.path.exists(os.path.join(manual_dir, info.filename)))]
    if (manual_dir is None or missing) and not _network_reachable(urls):
      if manual_dir is None:
        raise UserError(f"no network to download {name!r}: pass --manual-dir DIR with the files TFDS "
                        "would download (TFDS would otherwise retry for minutes)")
      raise UserError(f"--manual-dir {manual_dir} lacks {', '.join(missing)} (what TFDS downloads for {name!r}), "
                      "and there is no network to download it")
  config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
  try:
    builder.download_and_prepare(file_format="array_record", download_config=config)
  except Exception as e:  # checksum mismatch, missing manual file, download failure
    raise UserError(f"preparing TFDS dataset {name!r} failed: {str(e).strip().splitlines()[0]}") from None
  return builder.data_dir


def _network_reachable(urls: list[str], timeout: float = 3.0) -> bool:
  """Whether the host of any download URL answers on its port within `timeout` seconds."""
  import socket
  import urllib.parse

  for url in urls:
    parsed = urllib.parse.urlparse(url)
    try:
      socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout).close()
      return True
    except (OSError, TypeError):
      continue
  return False


# ----------------------------------------------------------------------------- corpus + cache


def default_cache_dir() -> str:
  return os.environ.get("NLM_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nlm-jax")


def _atomic_write(path: str, write) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


class Corpus:
  """The splits of one source as token ids, with the tokenizer that made them.

  `tokenizer=None` trains one on the training split (cached by source and tokenizer config);
  pass a run's saved tokenizer to encode with exactly its vocabulary.
  """

  def __init__(self, data_cfg, tokenizer_cfg, tokenizer: Optional[tokenizers.Tokenizer] = None,
               show_progress: bool = False):
    self.cfg = data_cfg
    self.progress = show_progress  # bars on stderr for reading and tokenizing that take over 2 s
    self.source = TFDSSource(data_cfg) if data_cfg.source == "tfds" else TextSource(data_cfg)
    self.source.progress = show_progress
    self._tokens: dict[str, np.ndarray] = {}
    self.cache_dir = data_cfg.cache_dir or default_cache_dir()
    self.tokenizer = tokenizer or self._train_tokenizer(tokenizer_cfg)
    self._fingerprint = tokenizers.fingerprint(self.tokenizer)

  def _train_tokenizer(self, tokenizer_cfg) -> tokenizers.Tokenizer:
    import dataclasses

    train = self.cfg.train_split
    identity = {"source": self.source.identity(train), "tokenizer": dataclasses.asdict(tokenizer_cfg)}
    include = None if tokenizer_cfg.include is None else tokenizers.read_include(tokenizer_cfg.include)
    if include is not None:  # the words it must hold, not just the file's name
      identity["include"] = hashlib.sha256(include.encode()).hexdigest()
    if tokenizer_cfg.kind == "sentencepiece":  # trained on lines over 4,192 bytes too since 2026-11-27
      identity["long_lines"] = True
    key = _digest(identity)
    path = os.path.join(self.cache_dir, f"tokenizer-{key}.json")
    if os.path.exists(path):
      try:
        return tokenizers.load(path)
      except UserError:  # damaged from outside (writes are atomic): a cache entry, made again
        warn(f"cached tokenizer {path} is unreadable; training it again")
    text = self._nonempty_text(train)
    tokenizer = tokenizers.train_tokenizer(tokenizer_cfg, text, include)
    payload = json.dumps(tokenizer.to_dict(), ensure_ascii=False).encode("utf-8")
    _atomic_write(path, lambda f: f.write(payload))
    return tokenizer

  def _nonempty_text(self, split: str) -> str:
    text = self.source.text(split)
    if not text.strip():
      raise UserError(f"the {split!r} split of the data is empty")
    return text

  def tokens(self, split: str) -> np.ndarray:
    """The split as int32 token ids (read from the cache when it was tokenized before); with
    data.reverse, last token first (a backward language model reads the text right to left)."""
    if split in self._tokens:
      return self._tokens[split]
    key = _digest({"source": self.source.identity(split), "tokenizer": self._fingerprint})
    path = os.path.join(self.cache_dir, f"tokens-{key}.npy")
    ids = None
    if os.path.exists(path):
      try:
        ids = np.load(path)
        if ids.ndim != 1 or ids.dtype != np.int32 or (ids.size and not 0 <= ids.min() <= ids.max()
                                                      < self.tokenizer.vocab_size):
          raise ValueError(f"not token ids of this vocabulary ({ids.dtype}, shape {ids.shape})")
      except (OSError, ValueError, EOFError) as e:  # damaged from outside: a cache entry, made again
        ids = None
        warn(f"cached tokens {path} are unreadable ({type(e).__name__}: {str(e)[:100]}); tokenizing again")
    if ids is None:
      ids = self._encode(self._nonempty_text(split), split)
      _atomic_write(path, lambda f: np.save(f, ids))
    if self.cfg.reverse:
      ids = np.ascontiguousarray(ids[::-1])
    self._tokens[split] = ids
    return ids

  def _encode(self, text: str, split: str, chunk_chars: int = 1 << 20) -> np.ndarray:
    """`tokenizer.encode(text)`, a chunk of whole lines at a time so that a bar can follow it
    (every tokenizer encodes line by line: the chunks' ids join into the text's ids)."""
    bar = progress.bar(self.progress, total=len(text), desc=f"tokenize {split}", unit="char", unit_scale=True)
    parts, start = [], 0
    while start < len(text):
      end = text.find("\n", start + chunk_chars)
      end = len(text) if end < 0 else end + 1
      parts.append(self.tokenizer.encode(text[start:end]))
      bar.update(end - start)
      start = end
    bar.close()
    return np.concatenate(parts).astype(np.int32) if parts else self.tokenizer.encode(text)
