"""Batches of token ids, as Grain datasets.

Two ways to cut a token stream w_0..w_{N−1} into (B, T) training batches:

  windows   (nanoGPT)   row b of a batch is w_{s_b..s_b+T} for a start s_b drawn without
                        replacement from the N−T possible starts, reshuffled every epoch;
  streams   (Zaremba)   the stream is cut into B contiguous rows of length L = ⌊(N−1)/B⌋, and
                        batch k is columns kT..(k+1)T of every row, so row b of batch k+1 continues
                        row b of batch k and a recurrent model's carry passes on (truncated BPTT).
                        `reset` marks the first batch of each epoch, where the carry starts over.

A whole-split evaluation (`eval_batches` with max_batches=None) scores every target token w_1..w_{N−1}
exactly once in either layout: partial windows and rows are padded, with mask 0 on the padding.

Every batch is a dict of NumPy arrays: inputs (B, T) int32, targets (B, T) int32 (the inputs
shifted by one), mask (B, T) float32 (0 on padding), reset (B,) bool. `rows` selects the rows
this process reads (multi-host: each process loads only its share of the global batch).
Training iterators are Grain `DatasetIterator`s: `get_state()` / `set_state()` make resume exact.
"""

from __future__ import annotations

import grain
import numpy as np

# A batch costs well under a millisecond to assemble, so one background thread keeps ahead of any
# training step; Grain's default (16 threads, 500 elements) only competes with XLA for the cores.
READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)


def _full_batch(inputs, targets, reset):
  return {"inputs": inputs.astype(np.int32), "targets": targets.astype(np.int32),
          "mask": np.ones(inputs.shape, np.float32), "reset": np.full((inputs.shape[0],), reset)}


def random_windows(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int,
                   rows: slice = slice(None)) -> grain.IterDataset:
  """Infinite batches of random windows (starts sampled without replacement per epoch)."""
  n_starts = len(tokens) - seq_len
  if n_starts < batch_size:
    raise ValueError(f"the training split has {len(tokens)} tokens: too few for batch_size={batch_size} "
                     f"windows of seq_len={seq_len}")
  offsets_T1 = np.arange(seq_len + 1)

  def windows(starts_B):
    w_BxT1 = tokens[starts_B[rows][:, None] + offsets_T1]
    return _full_batch(w_BxT1[:, :-1], w_BxT1[:, 1:], False)

  return (grain.MapDataset.range(n_starts).shuffle(seed=seed).repeat()
          .batch(batch_size, drop_remainder=True).map(windows).to_iter_dataset(READ_OPTIONS))


def stream_rows(tokens: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """The stream as B contiguous rows (B, L) of inputs and of targets (shifted by one)."""
  L = (len(tokens) - 1) // batch_size
  if L < 1:
    raise ValueError(f"the split has {len(tokens)} tokens: too few for {batch_size} stream rows")
  n = batch_size * L
  return tokens[:n].reshape(batch_size, L), tokens[1:n + 1].reshape(batch_size, L)


def contiguous_streams(tokens: np.ndarray, batch_size: int, seq_len: int,
                       rows: slice = slice(None)) -> grain.IterDataset:
  """Infinite truncated-BPTT batches: epoch after epoch over the B streams, T columns at a time
  (the last partial chunk of an epoch is dropped, so every batch is (B, T))."""
  inputs_BxL, targets_BxL = stream_rows(tokens, batch_size)
  n_chunks = inputs_BxL.shape[1] // seq_len
  if n_chunks < 1:
    raise ValueError(f"the training split has {len(tokens)} tokens: too few for batch_size={batch_size} "
                     f"streams of seq_len={seq_len}")
  inputs_BxL, targets_BxL = inputs_BxL[rows], targets_BxL[rows]

  def chunk(k):
    cols = slice(k * seq_len, (k + 1) * seq_len)
    return _full_batch(inputs_BxL[:, cols], targets_BxL[:, cols], k == 0)

  return grain.MapDataset.range(n_chunks).repeat().map(chunk).to_iter_dataset(READ_OPTIONS)


def length_bucketed(lengths, batch_size: int, seed: int, rows: slice, collate,
                    sort_chunk: int = 32) -> grain.IterDataset:
  """Infinite batches of examples of similar length (texts of a classification or translation
  task): each epoch shuffles the examples (seed, epoch) and leaves out n mod batch_size of them
  (random ones: a different few each epoch), sorts each chunk of `sort_chunk` batches' worth by
  length, cuts it into batches and shuffles the batches. `collate(indices)` makes the whole batch
  of the examples at `indices`, padded to its longest; each process keeps its `rows` of it, so
  that every process's part has the global batch's shape. A Grain iterator: its position is
  checkpointed, a resumed run reads on exactly."""
  import functools

  lengths = np.asarray(lengths)
  n = len(lengths)
  n_batches = n // batch_size
  if n_batches < 1:
    raise ValueError(f"{n} examples: too few for batch_size={batch_size}")

  @functools.lru_cache(maxsize=2)
  def plan(epoch: int) -> np.ndarray:
    rng = np.random.default_rng([seed, epoch])
    kept = rng.permutation(n)[:n_batches * batch_size]  # not the longest: they would be left out every epoch
    chunk = batch_size * sort_chunk
    order = np.concatenate([c[np.argsort(lengths[c], kind="stable")]
                            for c in np.split(kept, range(chunk, len(kept), chunk))])
    return order.reshape(n_batches, batch_size)[rng.permutation(n_batches)]

  def batch(index: int, _):
    whole = collate(plan(index // n_batches)[index % n_batches])
    return {key: value[rows] for key, value in whole.items()}

  return grain.MapDataset.range(n_batches).repeat().map_with_index(batch).to_iter_dataset(READ_OPTIONS)


def _padded(x: np.ndarray, length: int, axis: int) -> np.ndarray:
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, length - x.shape[axis])
  return np.pad(x, pad)


def eval_batch_count(n_tokens: int, batching: str, batch_size: int, seq_len: int,
                     max_batches: int | None = None) -> tuple[int, bool]:
  """How many batches `eval_batches` yields, and whether together they score every token of the split."""
  n_targets = n_tokens - 1
  if batching == "windows" and max_batches is not None:
    return min(max_batches, max(0, (n_tokens - seq_len) // batch_size)), False
  if batching == "windows":
    n_full = -(-(-(-n_targets // seq_len)) // batch_size)  # ⌈⌈(N−1)/T⌉ / B⌉
  else:
    n_full = -(-(-(-n_targets // batch_size)) // seq_len)  # ⌈⌈(N−1)/B⌉ / T⌉
  if max_batches is None or max_batches >= n_full:
    return n_full, True
  return max_batches, False


def eval_batches(tokens: np.ndarray, batching: str, batch_size: int, seq_len: int,
                 max_batches: int | None = None, seed: int = 0, rows: slice = slice(None),
                 pad_to: int | None = None):
  """Evaluation batches over a split, each (B, T) with a mask on padding; with `pad_to` (≥ B:
  the rows the mesh's shards need) each batch is padded to that many rows with mask 0, so the
  numbers do not depend on the devices (`rows`: this process's part of the padded batch).

  windows: max_batches=None scores every token once (consecutive non-overlapping windows);
           otherwise `max_batches` batches of random windows, the same ones for a given seed.
  streams: the split as B contiguous rows of L = ⌈(N−1)/B⌉ targets (the last row padded with
           mask 0), read T columns at a time (the carry passes on); max_batches=None reads all of
           it, so every token is scored once; otherwise the first `max_batches` chunks.
  """
  count, _ = eval_batch_count(len(tokens), batching, batch_size, seq_len, max_batches)
  n_targets = len(tokens) - 1
  B = max(pad_to or batch_size, batch_size)
  if batching == "windows":
    if max_batches is not None:
      ds = grain.MapDataset.range(len(tokens) - seq_len).shuffle(seed=seed)
      offsets_T1 = np.arange(seq_len + 1)
      for k in range(count):
        starts = np.asarray([ds[k * batch_size + b] for b in range(batch_size)])
        w_BxT1 = tokens[starts[:, None] + offsets_T1]
        batch = _full_batch(w_BxT1[:, :-1], w_BxT1[:, 1:], k == 0)
        yield {key: _padded(value, B, 0)[rows] if key != "reset" else np.full((B,), k == 0)[rows]
               for key, value in batch.items()}
      return
    n_windows = -(-n_targets // seq_len)
    inputs = _padded(tokens[:-1], n_windows * seq_len, 0).reshape(n_windows, seq_len)
    targets = _padded(tokens[1:], n_windows * seq_len, 0).reshape(n_windows, seq_len)
    mask = (np.arange(n_windows * seq_len) < n_targets).astype(np.float32).reshape(n_windows, seq_len)
    for k in range(count):
      sl = slice(k * batch_size, (k + 1) * batch_size)
      batch = {"inputs": _padded(inputs[sl], B, 0).astype(np.int32),
               "targets": _padded(targets[sl], B, 0).astype(np.int32),
               "mask": _padded(mask[sl], B, 0),
               "reset": np.full((B,), k == 0)}
      yield {key: value[rows] for key, value in batch.items()}
    return

  L = -(-n_targets // batch_size)  # the streams of `batch_size` rows; rows past it are all padding
  inputs_BxL = _padded(_padded(tokens[:-1], batch_size * L, 0).reshape(batch_size, L), B, 0)[rows]
  targets_BxL = _padded(_padded(tokens[1:], batch_size * L, 0).reshape(batch_size, L), B, 0)[rows]
  mask_BxL = _padded((np.arange(batch_size * L) < n_targets).astype(np.float32).reshape(batch_size, L), B, 0)[rows]
  for k in range(count):
    cols = slice(k * seq_len, (k + 1) * seq_len)
    yield {"inputs": _padded(inputs_BxL[:, cols], seq_len, 1).astype(np.int32),
           "targets": _padded(targets_BxL[:, cols], seq_len, 1).astype(np.int32),
           "mask": _padded(mask_BxL[:, cols], seq_len, 1),
           "reset": np.full((inputs_BxL.shape[0],), k == 0)}
