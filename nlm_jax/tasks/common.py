"""What the runs of example-based tasks (classification, translation) share: reading a split,
the mesh, the evaluation loop and batch, the periodic and final evaluations, the data
fingerprint and loading a pretrained body. A subclass sets `task`, `tokenizer`, `model_cfg`,
`body` (the parameters' subtree a pretrained LM fills; None: all of them) and defines
`read_file(path)` / `read_tfds(split)` (a split's raw examples), `examples(split)` (a tuple of
per-example arrays, first the token ids), `collate(indices, split, rows)`, `evaluate` and
`val_scores`."""

from __future__ import annotations

import hashlib
import os
from typing import Optional

import jax
import numpy as np

from nlm_jax import parallel
from nlm_jax.data import pipeline
from nlm_jax.errors import UserError
from nlm_jax.training import optim

BUCKET = 16  # padded lengths are multiples of this (fewer shapes to compile)


def padded_length(n: int, max_len: int) -> int:
  """n rounded up to a multiple of BUCKET, at most max_len."""
  return min(max_len, -(-n // BUCKET) * BUCKET)


def check_task_model(task_cfg, model_cfg) -> None:
  """One-line errors for task settings the model cannot honour: examples longer than a
  Transformer's context, a prefix LM on a recurrent or feedforward body."""
  if model_cfg.arch == "transformer" and task_cfg.max_len > model_cfg.context:
    raise UserError(f"config: task.max_len={task_cfg.max_len} exceeds model.context={model_cfg.context}")
  if task_cfg.prefix_lm and model_cfg.arch != "transformer":
    raise UserError(f"config: task.prefix_lm=true needs model.arch=transformer (a {model_cfg.arch} reads "
                    "left to right)")
  if task_cfg.prefix_lm and getattr(model_cfg, "attention", None) == "cudnn":
    raise UserError("config: task.prefix_lm=true needs model.attention=auto or xla (cuDNN's fused attention is "
                    "causal only: the prefix mask would be lost)")


class ExamplesRun:
  """The trainer's interface (see `trainer.Run`) for tasks whose data are separate examples."""

  unit = "examples"
  body: Optional[str] = None

  def _setup(self, cfg, mesh) -> None:
    self.cfg = cfg
    self.mesh = mesh if mesh is not None else parallel.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    parallel.check_batch(cfg.data.batch_size, self.mesh)
    self.lr_schedule = optim.schedule(cfg.optim, cfg.train.steps)
    self.rows = parallel.process_rows(cfg.data.batch_size, self.mesh)

  def raw(self, split: str) -> tuple:
    """The split's examples as read (cached): from `data.files[split]` or the TFDS dataset."""
    cache = self.__dict__.setdefault("_raw", {})
    if split not in cache:
      d = self.cfg.data
      if d.source == "tfds":
        cache[split] = self.read_tfds(split)
      else:
        if split not in d.files:
          raise UserError(f"no split {split!r} in data.files; available: {', '.join(d.files)}")
        cache[split] = self.read_file(os.path.abspath(os.path.expanduser(d.files[split])))
    return cache[split]

  def examples(self, split: str) -> tuple:
    raise NotImplementedError

  def train_source(self) -> str:
    """The name `examples` and `collate` know the training examples by: the training split."""
    return self.cfg.data.train_split

  def train_iterator(self):
    """Infinite training batches of examples of similar length (`pipeline.length_bucketed`)."""
    split = self.train_source()
    lengths = [len(x) for x in self.examples(split)[0]]
    return iter(pipeline.length_bucketed(lengths, self.cfg.data.batch_size, self.cfg.seed, self.rows,
                                         lambda chosen: self.collate(chosen, split, len(chosen))))

  def eval_batches(self, split: str, max_batches: Optional[int] = None, order: Optional[np.ndarray] = None):
    """(global batch, its number of real examples) for a split's evaluation batches (all of them,
    or the first `max_batches`), in the split's order (or the examples `order` lists):
    data.eval_batch_size examples each (the same ones on any mesh), padded with weight-0 rows to
    the mesh's rows (`eval_batch_size`)."""
    n = len(self.examples(split)[0])
    order = np.arange(n) if order is None else np.asarray(order)
    L, B = self.cfg.data.eval_rows, self.eval_batch_size()
    rows = parallel.process_rows(B, self.mesh)
    n_batches = -(-n // L) if max_batches is None else min(-(-n // L), max_batches)
    for k in range(n_batches):
      local = self.collate(order[k * L:(k + 1) * L].tolist(), split, B)
      yield self.global_batch({key: v[rows] for key, v in local.items()}, B), min(L, n - k * L)

  def eval_sums(self, params, split: str, max_batches: Optional[int]) -> dict:
    """The task's eval-step metrics summed over a split's batches (`eval_batches`)."""
    sums = None
    for batch, _ in self.eval_batches(split, max_batches):
      _, m = self.task.eval_step(params, None, batch)
      sums = m if sums is None else jax.tree.map(lambda a, b: a + b, sums, m)
    sums = jax.device_get(sums)
    if sums is None or float(sums["count"]) == 0:
      raise UserError(f"the {split!r} split has nothing to evaluate")
    return sums

  def periodic_evaluation(self, params, step: int) -> tuple[dict, dict]:
    """val_* of `train.eval_batches` batches of the evaluation split (`val_scores`), and
    eval_train_loss of as many (or `train.eval_train_batches`) of the training split."""
    t, d = self.cfg.train, self.cfg.data
    val = self.evaluate(params, d.eval_split, t.eval_batches)
    scores = self.val_scores(val)
    n_train = t.eval_train_batches
    if n_train is None:  # as many batches as validation's (never the whole training split: SST-2's is 77×)
      n_train = t.eval_batches or -(-len(self.examples(d.eval_split)[0]) // d.eval_rows)
    if n_train > 0:
      scores["eval_train_loss"] = self.evaluate(params, d.train_split, n_train)["loss"]
    return scores, val

  def final_evaluation(self, params, step: int, last_eval) -> dict:
    """The whole evaluation split (the last periodic evaluation's numbers when it scored all of it)."""
    if last_eval is not None and last_eval[0] == step and self.cfg.train.eval_batches is None:
      return last_eval[1]
    return self.evaluate(params, self.cfg.data.eval_split, None)

  def units_per_step(self) -> int:
    return self.cfg.data.batch_size * self.cfg.optim.grad_accum

  def check_data(self) -> None:
    d = self.cfg.data
    n = len(self.examples(d.train_split)[0])
    if n < d.batch_size:
      raise UserError(f"the {d.train_split!r} split has {n} examples: too few for data.batch_size={d.batch_size}")
    if not len(self.examples(d.eval_split)[0]):
      raise UserError(f"the {d.eval_split!r} split has no examples")

  def data_fingerprint(self, splits: Optional[list[str]] = None) -> dict[str, str]:
    """SHA-256 (16 hex digits) of each split's examples (the training and evaluation splits, or
    `splits`), as the model sees them."""
    out = {}
    for split in dict.fromkeys(splits or [self.cfg.data.train_split, self.cfg.data.eval_split]):
      h = hashlib.sha256()
      for part in self.examples(split):
        for x in (part if isinstance(part, list) else [part]):
          x = np.ascontiguousarray(x)
          h.update(np.int64(x.size).tobytes() + x.tobytes())
      out[split] = h.hexdigest()[:16]
    return out

  def save_files(self, workdir: str) -> None:
    """Files the run directory needs besides config and tokenizer (none by default)."""

  def load_pretrained(self, state, run_dir: str, step: Optional[int], body: Optional[str] = None):
    """The pretrained language model's parameters fill the body (`body`: another subtree, such as
    a classifier's backward body; a new head stays as initialized)."""
    from nlm_jax.training import checkpoint as ckpt_lib

    body = body or self.body
    abstract = self.task.abstract_state.params
    loaded, _ = ckpt_lib.read_params(run_dir, step, abstract[body] if body else abstract, best=True)
    return state.replace(params={**state.params, body: loaded} if body else loaded)

  def global_batch(self, local: dict[str, np.ndarray], batch_size: int) -> dict[str, jax.Array]:
    return parallel.global_batch(local, self.task.batch_sharding, batch_size)

  def eval_batch_size(self) -> int:
    """data.eval_batch_size (or batch_size) rows, padded to a multiple of the batch's shards."""
    return parallel.padded_rows(self.cfg.data.eval_rows, self.mesh)
