"""The training loop: one loop for every architecture.

    summary = train(load_config("experiments/configs/shakespeare_char_transformer.yaml",
                                ["workdir=runs/shakespeare"]))

Run directory:
    resolved_config.yaml   the config after overrides (what eval / generate rebuild from)
    tokenizer.json         the vocabulary
    metrics.jsonl          one JSON object per log / eval step (train_loss, and a task's own numbers
                           such as classification's train_accuracy; val_loss and eval_train_loss,
                           the periodic estimates); the same numbers as TensorBoard events in tb/,
                           which also get the final whole-split final_<split>_* of summary.json
    checkpoints/<step>/    Orbax: state, data-iterator state, config, tokenizer
    summary.json           written at the end

A run directory that already holds a checkpoint is resumed from its latest step, with the data
iterator, the PRNG stream and the truncated-BPTT carry restored: the resumed run is bitwise
identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from nlm_jax import config as config_lib
from nlm_jax import models, objectives, parallel, runtime
from nlm_jax.data import pipeline, tokenizers
from nlm_jax import progress as progress_lib
from nlm_jax.data.corpus import Corpus
from nlm_jax.errors import UserError
from nlm_jax.tasks import finetune
from nlm_jax.training import checkpoint as ckpt_lib
from nlm_jax.training import optim, runlock
from nlm_jax.training.steps import LMTask, config_options

CONFIG_FILE = "resolved_config.yaml"
FINGERPRINT_FILE = "data_fingerprint.json"
TOKENIZER_FILE = "tokenizer.json"
METRICS_FILE = "metrics.jsonl"
# Config sections a resumed run must share with the checkpoint it resumes.
RESUME_MUST_MATCH = ("task", "model", "tokenizer", "data.source", "data.name", "data.files", "data.file",
                     "data.split_fractions", "data.batching", "data.batch_size", "data.seq_len",
                     "optim.name", "optim.grad_accum", "seed")


def is_main_process() -> bool:
  return jax.process_index() == 0


def _lookup(d: dict, dotted: str):
  for part in dotted.split("."):
    d = d.get(part) if isinstance(d, dict) else None
  return d


def _first_difference(old: Any, new: Any, prefix: str, sides: tuple[str, str] = (" (checkpoint)", " (now)")
                      ) -> Optional[str]:
  """'prefix.key: old vs new' of the first (sorted) key where two nested dicts differ, each value
  followed by its side's label; None if they are equal."""
  if isinstance(old, dict) and isinstance(new, dict):
    for key in sorted(set(old) | set(new)):
      diff = _first_difference(old.get(key), new.get(key), f"{prefix}.{key}", sides)
      if diff:
        return diff
    return None
  return None if old == new else f"{prefix}: {old!r}{sides[0]} vs {new!r}{sides[1]}"


# ----------------------------------------------------------------------------- the run


def _summary_writer() -> type:
  """tensorboardX's SummaryWriter, imported without torch: its writer module imports torch when it
  is installed (seconds of every run's start-up: 2-3 s on a 2-core CPU, most of `nlm-jax train`'s
  start-up) only to accept torch tensors, and the metrics written here are Python numbers."""
  import sys

  if "torch" in sys.modules or "tensorboardX" in sys.modules:
    from tensorboardX import SummaryWriter

    return SummaryWriter
  sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class Run:
  """Everything a language-modelling run needs, built from its config: corpus, tokenizer, model,
  mesh, steps. Other tasks (`nlm_jax.tasks`) give the trainer the same interface: `task`,
  `tokenizer`, `lr_schedule`, `train_iterator`, `global_batch`, `periodic_evaluation`,
  `final_evaluation`, `check_data`, `data_fingerprint`, `units_per_step`, `load_pretrained`."""

  unit = "tokens"  # what metrics.jsonl counts: tokens (LM), examples (classification)

  def __init__(self, cfg: config_lib.Config, tokenizer: Optional[tokenizers.Tokenizer] = None,
               mesh=None):
    self.cfg = cfg
    self.corpus = Corpus(cfg.data, cfg.tokenizer, tokenizer, show_progress=cfg.train.progress and is_main_process())
    self.tokenizer = self.corpus.tokenizer
    self.model_cfg = config_lib.model_config(cfg, self.tokenizer.vocab_size)
    self.model = models.build(self.model_cfg)
    self.mesh = mesh if mesh is not None else parallel.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    parallel.check_batch(cfg.data.batch_size, self.mesh)
    self.uses_carry = cfg.data.batching == "streams" and self.model_cfg.arch != "transformer"
    if self.model_cfg.arch == "transformer" and cfg.data.seq_len > self.model_cfg.context:
      raise UserError(f"config: data.seq_len={cfg.data.seq_len} exceeds model.context={self.model_cfg.context}")
    if cfg.train.eval_estimator == "random_windows" and cfg.train.eval_batches is None:
      raise UserError("config: train.eval_estimator=random_windows needs train.eval_batches (nanoGPT: 200)")
    if (cfg.train.eval_train_batches or 0) < 0:
      raise UserError(f"config: train.eval_train_batches={cfg.train.eval_train_batches}; must be ≥ 0 or null")
    self.tx = optim.make_optimizer(cfg.optim, cfg.train.steps, finetune.lr_groups(cfg, self.model_cfg, head=None))
    self.lr_schedule = optim.schedule(cfg.optim, cfg.train.steps)
    finetune.freeze(cfg, head=None)  # a language model has no new head: refused if asked for
    self.task = LMTask(self.model, self.tx, optim.plateau(cfg.optim), self.mesh, cfg.data.batch_size,
                       self.uses_carry, example_len=min(cfg.data.seq_len, 8), **config_options(cfg))
    self.rows = parallel.process_rows(cfg.data.batch_size, self.mesh)

  def units_per_step(self) -> int:
    """Training tokens per optimizer step."""
    return self.cfg.data.batch_size * self.cfg.data.seq_len * self.cfg.optim.grad_accum

  def check_data(self) -> None:
    _check_split_lengths(self)

  def data_fingerprint(self, splits: Optional[list[str]] = None) -> dict[str, str]:
    return data_fingerprint(self, splits)

  def save_files(self, workdir: str) -> None:
    """Files the run directory needs beside the config and the tokenizer (none for LM)."""

  def load_pretrained(self, state, run_dir: str, step: Optional[int]):
    """`state` with the parameters of a pretrained run (`train.init_from`): all of them."""
    params, _ = ckpt_lib.read_params(run_dir, step, self.task.abstract_state.params, best=True)
    return state.replace(params=params)

  def final_evaluation(self, params, step: int, last_eval) -> dict:
    """The whole evaluation split with the final parameters: `{name: value}` for summary.json
    (as final_<split>_<name>). When the evaluation at this step already scored the whole split
    (train.eval_batches: null, estimator 'fixed'), its numbers are these ones and are reused."""
    cfg = self.cfg
    whole = cfg.train.eval_estimator == "fixed" and self.eval_plan(cfg.data.eval_split, cfg.train.eval_batches)[1]
    if last_eval is not None and last_eval[0] == step and whole:
      return last_eval[1]
    return self.evaluate(params, cfg.data.eval_split, None)

  def train_iterator(self):
    tokens = self.corpus.tokens(self.cfg.data.train_split)
    d = self.cfg.data
    try:
      if d.batching == "windows":
        return iter(pipeline.random_windows(tokens, d.batch_size, d.seq_len, self.cfg.seed, self.rows))
      return iter(pipeline.contiguous_streams(tokens, d.batch_size, d.seq_len, self.rows))
    except ValueError as e:
      raise UserError(str(e)) from None

  def global_batch(self, local: dict[str, np.ndarray], batch_size: int) -> dict[str, jax.Array]:
    return parallel.global_batch(local, self.task.batch_sharding, batch_size)

  def eval_batch_size(self) -> int:
    """The evaluation batch's rows on the mesh: data.eval_batch_size (or batch_size) rows of data,
    padded with mask-0 rows to a multiple of the batch's shards (and of the processes)."""
    return parallel.padded_rows(self.cfg.data.eval_rows, self.mesh)

  def eval_plan(self, split: str, max_batches: Optional[int], batching: Optional[str] = None) -> tuple[int, bool]:
    """(batches, whether they score every token of the split) of `evaluate` with these arguments."""
    d = self.cfg.data
    return pipeline.eval_batch_count(len(self.corpus.tokens(split)), batching or d.batching,
                                     d.eval_rows, d.seq_len, max_batches)

  def evaluate(self, params, split: str, max_batches: Optional[int], seed: int = 0,
               batching: Optional[str] = None) -> dict[str, float]:
    """Mean NLL over a split (all of it, or `max_batches` batches), perplexity, bits/token.
    `batching='windows'` scores random windows (each from a fresh state) whatever data.batching is."""
    d = self.cfg.data
    batching = batching or d.batching
    tokens = self.corpus.tokens(split)
    batch_size = self.eval_batch_size()  # the data's rows (the same on any mesh), then mask-0 ones
    rows = parallel.process_rows(batch_size, self.mesh)
    carry = self.task.initial_carry(batch_size) if self.uses_carry and batching == "streams" else None
    n_batches, _ = self.eval_plan(split, max_batches, batching)
    bar = progress_bar(self.cfg, total=n_batches, desc=f"eval {split}", unit="batch")
    nll_sum, count, previous = 0.0, 0.0, None
    for local in pipeline.eval_batches(tokens, batching, d.eval_rows, d.seq_len, max_batches,
                                       seed, rows, pad_to=batch_size):
      carry, m = self.task.eval_step(params, carry, self.global_batch(local, batch_size))
      nll_sum, count = nll_sum + m["nll_sum"], count + m["count"]
      if previous is not None:  # the bar follows the device, one batch behind the host
        jax.block_until_ready(previous)
        bar.update(1)
      previous = m
    nll_sum, count = float(nll_sum), float(count)
    bar.update(1 if previous is not None else 0)
    bar.close()
    if count == 0:
      raise UserError(f"the {split!r} split has no tokens to evaluate")
    loss = nll_sum / count
    out = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(count)}
    if self.tokenizer.kind in ("char", "byte"):
      out["bits_per_char" if self.tokenizer.kind == "char" else "bits_per_byte"] = float(
          objectives.bits_per_token(nll_sum, count))
    return out


  def periodic_batching(self) -> str:
    """How the periodic evaluation reads a split: random windows under
    `train.eval_estimator=random_windows`, whatever data.batching is; else data.batching."""
    return "windows" if self.cfg.train.eval_estimator == "random_windows" else self.cfg.data.batching

  def periodic_evaluation(self, params, step: int) -> tuple[dict[str, float], dict[str, float]]:
    """The numbers logged at each evaluation, in eval mode (no dropout), by `train.eval_estimator`:

      val_loss, val_perplexity   `train.eval_batches` batches of the validation split (all of it when null)
      eval_train_loss            as many batches of the training split (or `train.eval_train_batches`;
                                 0: not measured), by the same estimator

    'fixed' scores the same batches at every evaluation (seed + 1); 'random_windows' draws fresh
    random windows of each split at each step, as nanoGPT's estimate_loss does. Returns these
    numbers and the validation split's whole result (`evaluate`'s dict).
    """
    t, d = self.cfg.train, self.cfg.data
    batching = self.periodic_batching()
    if t.eval_estimator == "random_windows":
      seed_val, seed_train = (int(np.random.SeedSequence([self.cfg.seed, step, i]).generate_state(1)[0])
                              for i in (0, 1))
    else:
      seed_val, seed_train = self.cfg.seed + 1, self.cfg.seed + 1
    val = self.evaluate(params, d.eval_split, t.eval_batches, seed_val, batching)
    scores = {"val_loss": val["loss"], "val_perplexity": val["perplexity"]}
    n_train = t.eval_train_batches
    if n_train is None:
      n_train = t.eval_batches or self.eval_plan(d.eval_split, None, batching)[0]
    if n_train > 0:
      scores["eval_train_loss"] = self.evaluate(params, d.train_split, n_train, seed_train, batching)["loss"]
    return scores, val


def progress_bar(cfg: config_lib.Config, **kwargs):
  """A bar on stderr when `train.progress` is on, from process 0 only (`nlm_jax.progress.bar`)."""
  return progress_lib.bar(cfg.train.progress and is_main_process(), **kwargs)


# ----------------------------------------------------------------------------- logging


class MetricsLog:
  """metrics.jsonl (always) and TensorBoard events (tb/), written by process 0 only."""

  def __init__(self, workdir: str, resume_step: int):
    self.enabled = is_main_process()
    self.path = os.path.join(workdir, METRICS_FILE)
    self.tb = None
    if not self.enabled:
      return
    if os.path.exists(self.path):  # drop lines past the step we resume from
      kept, torn = [], 0
      with open(self.path, encoding="utf-8", errors="replace") as f:
        for line in f:
          try:
            record = json.loads(line) if line.strip() else None
          except ValueError:  # a line cut short (disk full, power lost while writing)
            record, torn = None, torn + 1
          if isinstance(record, dict) and record.get("step", 0) <= resume_step:
            kept.append(line if line.endswith("\n") else line + "\n")
      if torn:
        ckpt_lib.warn(f"{self.path}: {torn} line(s) that are not JSON records dropped (cut short while written?)")
      _write_atomically(self.path, "".join(kept))
    self.tb = _summary_writer()(os.path.join(workdir, "tb"), purge_step=resume_step + 1 if resume_step else None)

  def write(self, record: dict[str, Any], jsonl: bool = True) -> None:
    if not self.enabled:
      return
    if jsonl:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)):
        self.tb.add_scalar(key, value, record["step"])

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


# ----------------------------------------------------------------------------- train


def _prepare_workdir(cfg: config_lib.Config) -> tuple[str, bool]:
  """Checks the run directory; returns (path, whether it holds a run to resume)."""
  workdir = os.path.abspath(cfg.workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"workdir {workdir} exists and is not a directory")
  ours = os.path.exists(os.path.join(workdir, CONFIG_FILE))
  if os.path.isdir(workdir) and set(os.listdir(workdir)) - {runlock.LOCK_FILE} and not ours:
    raise UserError(f"workdir {workdir} is not empty and holds no nlm-jax run; choose a new directory")
  return workdir, ours


def _resolved_model(fields: Any) -> Any:
  """model.* as the network is built from it: every field of the architecture's config, defaults
  filled in (so a key set to its default is no change); the dict as given where it does not build."""
  if not isinstance(fields, dict):
    return fields
  try:
    return models.config_to_dict(models.config_from_dict({"vocab_size": 2, **fields}))
  except (ValueError, TypeError):
    return fields


def _check_resumable(saved: dict, now: dict, workdir: str) -> None:
  for key in RESUME_MUST_MATCH:
    old, new = _lookup(saved, key), _lookup(now, key)
    if key == "model":
      old, new = _resolved_model(old), _resolved_model(new)
    diff = _first_difference(old, new, key)
    if diff:
      raise UserError(f"workdir {workdir} holds a run with a different config ({diff}); "
                      "use a new workdir or the same config")


def _schedule_shape(c: dict) -> dict:
  """What fixes η_t: its kind, warm-up, and the cosine's length (train.steps unless decay_steps)."""
  o = c.get("optim", {})
  length = (o.get("decay_steps") or c.get("train", {}).get("steps")) if o.get("schedule") == "warmup_cosine" else None
  return {"optim.schedule": o.get("schedule"), "optim.warmup_steps": o.get("warmup_steps"),
          "cosine length (optim.decay_steps or train.steps)": length}


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in d.items():
    if isinstance(value, dict) and value:
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


# Changes that cannot alter a resumed run's arithmetic, and so go unremarked.
RESUME_UNREMARKED = ("workdir", "train.stop_after", "train.progress", "train.allow_data_change",
                     "train.allow_schedule_change", "distributed", "mesh")


def _check_resume_changes(saved: dict, now: dict, allow_schedule_change: bool) -> None:
  """A resumed run with another schedule shape is refused (unless allowed); any other changed
  setting is named in one warning, and resolved_config.yaml then records the new values."""
  old_shape, new_shape = _schedule_shape(saved), _schedule_shape(now)
  changed = [f"{k}: {old_shape[k]!r} (checkpoint) vs {new_shape[k]!r} (now)" for k in old_shape
             if old_shape[k] != new_shape[k]]
  if changed and not allow_schedule_change:
    raise UserError(f"resuming with another learning-rate schedule ({changed[0]}) would reshape it midway; "
                    "set train.allow_schedule_change=true to do so, or train.stop_after to stop early")
  old, new = (_flat({**c, "model": _resolved_model(c.get("model"))}) for c in (saved, now))
  diffs = [f"{k}: {old[k]!r} (checkpoint) vs {new.get(k)!r} (now)" for k in sorted(old)
           if old[k] != new.get(k) and k not in RESUME_UNREMARKED and k.split(".")[0] not in RESUME_UNREMARKED]
  if diffs and is_main_process():
    ckpt_lib.warn(f"resuming with changed settings: {'; '.join(diffs)}; {CONFIG_FILE} now records them")


def data_fingerprint(run: "Run", splits: Optional[list[str]] = None) -> dict[str, str]:
  """SHA-256 (16 hex digits) of the token ids of the training and evaluation splits (or `splits`)."""
  import hashlib

  splits = dict.fromkeys(splits or [run.cfg.data.train_split, run.cfg.data.eval_split])
  return {split: hashlib.sha256(np.ascontiguousarray(run.corpus.tokens(split)).tobytes()).hexdigest()[:16]
          for split in splits}


def data_changed(run, workdir: str, split: str) -> Optional[str]:
  """What differs between `split` as this run reads it now and as its training recorded it
  (data_fingerprint.json), or None (the same, or not recorded)."""
  try:
    with open(os.path.join(workdir, FINGERPRINT_FILE)) as f:
      saved = json.load(f).get(split)
  except (OSError, ValueError, AttributeError):
    return None
  if saved is None:
    return None
  now = run.data_fingerprint([split])[split]
  return None if now == saved else (f"the {split!r} split's text is not the one this run recorded (token "
                                    f"fingerprint {saved} then, {now} now; a relative data path is read from "
                                    "the current directory)")


def _check_data(workdir: str, fingerprint: dict, resuming: bool, allow_change: bool) -> None:
  """Refuses (or warns, with train.allow_data_change) to resume on data whose tokens changed.
  Writes nothing: `_train` records the fingerprint once the run is known to start."""
  path = os.path.join(workdir, FINGERPRINT_FILE)
  if resuming and os.path.exists(path):
    try:
      with open(path) as f:
        saved = json.load(f)
    except (OSError, ValueError) as e:
      raise UserError(f"{path} is unreadable ({e}); delete it to resume without the data check") from None
    changed = [s for s in fingerprint if saved.get(s) not in (None, fingerprint[s])]
    if changed:
      key = changed[0]  # a split's name, or what else was fingerprinted ("the teachers' soft targets ...")
      thing = key if key.startswith("the ") else f"the {key!r} split's text"
      what = f"{thing} changed since this run started (fingerprint {saved[key]} then, {fingerprint[key]} now)"
      if not allow_change:
        raise UserError(f"{what}; restore the data, use a new workdir, or set train.allow_data_change=true")
      ckpt_lib.warn(f"{what}; continuing (train.allow_data_change=true)")


def _write_atomically(path: str, text: str) -> None:
  """An interrupted write leaves the previous file, never half of one."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def _check_split_lengths(run: "Run") -> None:
  """Each split the periodic evaluation reads holds enough tokens for its batches, read as it reads
  them (`train.eval_estimator=random_windows`: windows, whatever data.batching is; the training
  split too, for eval_train_loss, in batches of data.eval_batch_size rows): fail now, not at the
  first evaluation after `eval_every` steps of work (the training batches are checked by their
  iterator). The test is `eval_plan`'s, the batch count `evaluate` uses."""
  d, t = run.cfg.data, run.cfg.train
  batching = run.periodic_batching()
  rows = d.eval_rows
  splits = [(d.eval_split, t.eval_batches, "", [])]
  if t.eval_train_batches != 0:  # a number of batches (`periodic_evaluation`), never the whole split
    splits.append((d.train_split, 1, "eval_train_loss's ", ["set train.eval_train_batches=0"]))
  for split, max_batches, purpose, fixes in splits:
    if run.eval_plan(split, max_batches, batching)[0] >= 1:
      continue
    if batching == "windows" and max_batches is not None:  # random windows of seq_len
      what = f"{rows} windows of data.seq_len={d.seq_len} (needs {d.seq_len + rows})"
      fixes = ["lower data.seq_len or data.eval_batch_size", *fixes]
    else:  # consecutive windows, or streams (rows past the split's end are mask-0 padding)
      what = "one target (needs 2)"
    fixes = [*fixes, "give it more text"]
    remedy = fixes[0] if len(fixes) == 1 else ", ".join(fixes[:-1]) + ", or " + fixes[-1]
    raise UserError(f"the {split!r} split has {len(run.corpus.tokens(split))} tokens: too few for {purpose}{what}; "
                    f"{remedy}")


def _resume_point(cfg: config_lib.Config, workdir: str, existing: bool):
  """(checkpoints, newest intact step, tokenizer, its config) of a run to resume; Nones for a new run."""
  if not (existing and os.path.isdir(os.path.join(workdir, "checkpoints"))):
    return None, None, None, None
  # A damaged newer step is moved aside: this run will save its step number again.
  damaged = os.path.join(workdir, "checkpoints.damaged")
  ckpts = ckpt_lib.Checkpoints(workdir, cfg.train.keep_checkpoints, set_aside=damaged)
  step = ckpts.newest_intact(set_aside=damaged)
  if step is None and (ckpts.set_aside or (os.path.isdir(damaged) and os.listdir(damaged))):
    # now or at an earlier try: starting over would write a new run over this one's records
    raise UserError(f"no intact checkpoint is left in {ckpts.directory} (the damaged ones were moved to "
                    f"{damaged}); to start over, use a new workdir")
  if step is None:
    return ckpts, None, None, None
  saved = ckpts.read_json(step, "config")
  _check_resumable(saved, config_lib.to_dict(cfg), workdir)
  return ckpts, step, tokenizers.from_dict(ckpts.read_json(step, "tokenizer")), saved


def _init_from_source(cfg: config_lib.Config):
  """(run dir, step, tokenizer) of the run `train.init_from` names: a language model whose
  tokenizer config and model (but for settings like dropout) are this run's, so that the new
  phase keeps the vocabulary and the network the parameters were trained with, and which reads
  text in this run's direction (a classifier's forward body: left to right)."""
  run_dir, step, source, tokenizer = _pretrained_source(cfg, cfg.train.init_from, "init_from")
  if source.data.reverse != cfg.data.reverse:
    raise UserError(f"init_from {run_dir} is a {'backward' if source.data.reverse else 'forward'} language model "
                    f"(data.reverse={str(source.data.reverse).lower()}) and this run reads text "
                    f"{'right to left' if cfg.data.reverse else 'left to right'}"
                    + (" (a backward one fills task.backward's body: train.init_backward_from)"
                       if source.data.reverse and cfg.task.kind == "classify" else ""))
  return run_dir, step, tokenizer


def _init_backward_source(cfg: config_lib.Config, tokenizer) -> tuple[str, Optional[int]]:
  """(run dir, step) of `train.init_backward_from`: a backward language model (data.reverse) with
  `tokenizer`'s vocabulary (the forward one's) and this run's model."""
  run_dir, step, source, backward_tokenizer = _pretrained_source(cfg, cfg.train.init_backward_from,
                                                                 "init_backward_from")
  if not source.data.reverse:
    raise UserError(f"init_backward_from {run_dir} reads text left to right (data.reverse=false); the backward "
                    "body needs a language model of the reversed text (train one with data.reverse=true)")
  if backward_tokenizer.to_dict() != tokenizer.to_dict():
    raise UserError(f"init_backward_from {run_dir} has another vocabulary than init_from's run: train both "
                    "language models on the same text with the same tokenizer settings")
  return run_dir, step


def _pretrained_source(cfg: config_lib.Config, where: str, key: str):
  """(run dir, step, config, tokenizer) of a pretrained language model for `train.<key>`, after
  checking its task, tokenizer config and architecture against this run's."""
  run_dir, step = ckpt_lib.resolve(where)  # step None: its best, else latest
  if not os.path.exists(os.path.join(run_dir, CONFIG_FILE)):
    raise UserError(f"{key} {run_dir}: no nlm-jax run there (no {CONFIG_FILE})")
  source = config_lib.load_config(os.path.join(run_dir, CONFIG_FILE), [])
  if source.task.kind != "lm":
    raise UserError(f"{key} {run_dir} is a task.kind={source.task.kind} run; start from a language "
                    "model (task.kind=lm)")
  old_tok, new_tok = dataclasses.asdict(source.tokenizer), dataclasses.asdict(cfg.tokenizer)
  if old_tok != new_tok:
    name = next(k for k in sorted(old_tok) if old_tok[k] != new_tok[k])
    raise UserError(f"{key} {run_dir} has a different vocabulary (tokenizer.{name}: {old_tok[name]!r} "
                    f"(pretrained) vs {new_tok[name]!r} (now))")
  tokenizer = tokenizers.load(os.path.join(run_dir, TOKENIZER_FILE))
  diff = finetune.model_difference(config_lib.model_config(source, tokenizer.vocab_size),
                                   config_lib.model_config(cfg, tokenizer.vocab_size))
  if diff:
    raise UserError(f"{key} {run_dir} has a different architecture ({diff})")
  return run_dir, step, source, tokenizer


@contextlib.contextmanager
def _stop_requests():
  """Collects SIGINT / SIGTERM instead of dying mid-step: the loop saves, then stops."""
  requests: list[int] = []
  previous = {}
  for sig in (signal.SIGINT, signal.SIGTERM):
    try:
      previous[sig] = signal.signal(sig, lambda signum, frame: requests.append(signum))
    except ValueError:  # not the main thread
      pass
  try:
    yield requests
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


def _stop_agreed(requests: list[int], step: int, every: int) -> bool:
  """Whether to stop before `step`: a SIGINT / SIGTERM came. With several processes, they agree
  every `every` steps (an all-gather of "did any process get one?"), so that all stop at and
  save the same step even when only one of them was signalled."""
  if jax.process_count() == 1:
    return bool(requests)
  if step % every:
    return False
  from jax.experimental import multihost_utils

  return bool(np.asarray(multihost_utils.process_allgather(np.int32(len(requests) > 0))).any())


def _not_finite(what: str, step: int, last_saved: Optional[int], directory: str) -> UserError:
  kept = (f"the last good checkpoint (step {last_saved}) is kept in {directory}" if last_saved is not None
          else "no checkpoint was saved")
  return UserError(f"{what} by step {step}; stopped: {kept}; lower optim.lr or set optim.clip_norm")


def _finite_mean_loss(metrics: list[dict], step: int, last_saved: Optional[int], directory: str) -> float:
  """Mean training loss of the steps since the last check. Stops the run if it, or the parameters
  after any of these steps, are NaN or Inf: before anything is saved, so every checkpoint holds
  finite parameters and the last one saved is the last good one."""
  if not metrics:
    return float("nan")
  if not all(bool(m["params_finite"]) for m in metrics):
    raise _not_finite("the parameters became NaN or Inf", step, last_saved, directory)
  loss = float(sum(m["nll_sum"] for m in metrics) / sum(m["count"] for m in metrics))
  if not math.isfinite(loss):
    raise _not_finite(f"training loss is {loss}", step, last_saved, directory)
  return loss


def configure_runtime(cfg: config_lib.Config) -> None:
  """The run's device settings (`train.deterministic`), before JAX starts a backend."""
  try:
    runtime.configure(deterministic=cfg.train.deterministic)
  except RuntimeError as e:
    raise UserError(f"{e} (or train.deterministic=false)") from None


def _final_evaluation(run, params, step: int, last_eval, workdir: str) -> dict:
  """`final_<split>_loss` etc.: the whole evaluation split scored with the final parameters
  (`run.final_evaluation`), also written to TensorBoard."""
  t0, split = time.time(), run.cfg.data.eval_split
  final = run.final_evaluation(params, step, last_eval)
  out = {f"final_{split}_{name}": v for name, v in final.items()}
  log = MetricsLog(workdir, step)
  log.write({"step": step, **{key: value for key, value in out.items()
                              if not key.endswith(("_tokens", "_examples"))}},
            jsonl=False)  # metrics.jsonl keeps one kind of line: a training step's record
  log.close()
  return {**out, "final_eval_s": round(time.time() - t0, 2)}


def train(cfg: config_lib.Config, started: Optional[float] = None) -> dict[str, Any]:
  """Trains (or resumes) the run `cfg` describes, holding its workdir's lock; returns the summary.
  `started`: when the command began (time.time()), so that wall_time_s covers all it did."""
  if cfg.train.deterministic and cfg.model.get("attention") == "cudnn":
    raise UserError("model.attention=cudnn cannot train with train.deterministic=true: XLA has no deterministic "
                    "cuDNN attention backward pass; set model.attention=auto (XLA's attention) or "
                    "train.deterministic=false")
  workdir, _ = _prepare_workdir(cfg)
  with runlock.workdir_lock(workdir) if is_main_process() else contextlib.nullcontext():
    return _train(cfg, started)


def _train(cfg: config_lib.Config, started: Optional[float] = None) -> dict[str, Any]:
  t_start = started or time.time()
  configure_runtime(cfg)
  workdir, existing = _prepare_workdir(cfg)
  cfg_dict = config_lib.to_dict(cfg)
  ckpts, resume_step, tokenizer, saved_cfg = _resume_point(cfg, workdir, existing)
  init_from = init_backward = None
  if resume_step is None and cfg.train.init_from:
    *init_from, tokenizer = _init_from_source(cfg)
    if cfg.train.init_backward_from:
      init_backward = _init_backward_source(cfg, tokenizer)

  run = make_run(cfg, tokenizer)
  bodies = [getattr(run, "body", None)] + ([run.backward_body] if init_backward is not None else [])
  if init_from is not None:  # before anything is written (a backward body has the same groups)
    finetune.check_reinit(list(cfg.finetune.reinit), run.task.abstract_state.params, bodies[0])
  run.check_data()
  fingerprint = run.data_fingerprint()
  _check_data(workdir, fingerprint, resume_step is not None, cfg.train.allow_data_change)

  # Everything that can refuse the run comes before anything is written into its workdir: a
  # refused resume must leave the run's records (its config, its data fingerprint) as they were.
  data_iter = run.train_iterator()
  if resume_step is not None:
    state = ckpts.restore(resume_step, run.task.abstract_state, data_iter, getattr(run, "retired_params", None))
    if not ckpt_lib.all_finite(state.params):  # saved before checkpoints were checked for NaN
      raise UserError(f"checkpoint {ckpts.step_dir(resume_step)} holds NaN or Inf parameters; move it "
                      f"out of {ckpts.directory} to resume from an earlier one")
    _check_resume_changes(saved_cfg, cfg_dict, cfg.train.allow_schedule_change)
  if is_main_process():
    os.makedirs(workdir, exist_ok=True)
    _write_atomically(os.path.join(workdir, CONFIG_FILE), config_lib.to_yaml(cfg))
    tokenizers.save(run.tokenizer, os.path.join(workdir, TOKENIZER_FILE))
    run.save_files(workdir)
    _write_atomically(os.path.join(workdir, FINGERPRINT_FILE), json.dumps(fingerprint, indent=2))
  ckpts = ckpts or ckpt_lib.Checkpoints(workdir, cfg.train.keep_checkpoints)

  if resume_step is None:
    state = run.task.init(jax.random.key_data(jax.random.key(cfg.seed)))
    if cfg.init_seed is not None:  # the network (and its optimizer state) of init_seed, dropout's key of seed
      state = run.task.init(jax.random.key_data(jax.random.key(cfg.init_seed))).replace(key=state.key)
    if init_from is not None:
      initial = state.params
      state = run.load_pretrained(state, *init_from)
      if init_backward is not None:
        state = run.load_pretrained(state, *init_backward, body=run.backward_body)
      for body in bodies:
        state = state.replace(params=finetune.reinit(state.params, initial, list(cfg.finetune.reinit), body))
      if state.ema is not None:  # the average starts at the loaded network (its own buffers: donated)
        state = state.replace(ema=jax.tree.map(jnp.copy, state.params))

  k = cfg.optim.grad_accum
  start = int(state.step) // k
  stop = min(cfg.train.steps, cfg.train.stop_after or cfg.train.steps)
  log = MetricsLog(workdir, start)
  tokens_per_step = run.units_per_step()  # tokens (LM) or examples (classification) per optimizer step
  every_ckpt = cfg.train.checkpoint_every or cfg.train.eval_every

  progress = None
  if is_main_process() and cfg.train.progress:
    from tqdm import tqdm

    progress = tqdm(total=stop, initial=start, unit="step", dynamic_ncols=True, desc="train")

  def save(step, val_loss=None, log_window=None):
    ckpts.save(step, state, data_iter, cfg_dict, run.tokenizer.to_dict(), val_loss, log_window=log_window)

  last_saved = resume_step
  # the metrics of the micro-batches since the last training-log record (a resumed run starts with
  # those its checkpoint carried, so its records average the same steps as an uninterrupted run's)
  pending: list[dict] = ckpts.log_window(resume_step) if resume_step is not None else []
  window_start = time.time()
  window_steps = 0
  last_val = None
  last_eval = None  # (step, validation result) of the latest evaluation
  t_loop = time.time()
  stopped = False  # a stop request all processes agreed on
  with _stop_requests() as interrupted:
    try:
      step = start
      while step < stop and not (stopped := _stop_agreed(interrupted, step, cfg.train.log_every)):
        for _ in range(k):
          batch = run.global_batch(next(data_iter), cfg.data.batch_size)
          state, metrics = run.task.train_step(state, batch)
          pending.append(metrics)
        step += 1
        window_steps += 1
        is_eval = step % cfg.train.eval_every == 0 or step == cfg.train.steps
        is_save = step % every_ckpt == 0 or step == stop
        # Saves come right after a finiteness check of every loss since the last one.
        if step % cfg.train.log_every == 0 or is_eval or is_save:
          fetched = jax.device_get(pending)
          # A stop between records (train.stop_after) logs what it has, and its checkpoint carries
          # these steps' metrics on to the next record (train.steps and regular saves end a window).
          mid_window = (step == stop < cfg.train.steps and step % cfg.train.log_every != 0 and not is_eval
                        and step % every_ckpt != 0)
          pending = fetched if mid_window else []
          loss = _finite_mean_loss(fetched, step, last_saved, ckpts.directory)
          elapsed = time.time() - window_start
          record = {"step": step, run.unit: step * tokens_per_step, "train_loss": loss,
                    "train_perplexity": math.exp(min(loss, 700.0)),
                    **run.task.train_scores(fetched), "grad_norm": float(fetched[-1]["grad_norm"]),
                    "lr": float(run.lr_schedule(step - 1)) * float(state.plateau.scale),
                    f"{run.unit}_per_s": window_steps * tokens_per_step / max(elapsed, 1e-9),
                    "elapsed_s": round(time.time() - t_loop, 3)}  # this process's loop so far (evals included)
          window_start, window_steps = time.time(), 0
          if is_eval:
            t_eval = time.time()
            scores, val = run.periodic_evaluation(run.task.model_params(state), step)
            if not math.isfinite(val["loss"]):
              raise _not_finite(f"validation loss is {val['loss']}", step, last_saved, ckpts.directory)
            last_val, last_eval = val["loss"], (step, val)
            record.update(scores)
            if cfg.optim.schedule == "plateau":
              state = run.task.update_plateau(state, jnp.asarray(val["loss"], jnp.float32))
            window_start = time.time()  # evaluation time is not training throughput,
            if progress is not None:  # nor the bar's rate
              progress.start_t += window_start - t_eval
              progress.last_print_t += window_start - t_eval
          log.write(record)
          if progress is not None:
            progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record[f'{run.unit}_per_s']:.0f}",
                                 **({"val": f"{last_val:.4f}"} if is_eval else {}))
        if progress is not None:
          progress.update(1)
        if is_save:
          save(step, last_val if is_eval else None, log_window=pending)
          last_saved = step
      if stopped and last_saved != step:
        pending = jax.device_get(pending)
        _finite_mean_loss(pending, step, last_saved, ckpts.directory)
        save(step, log_window=pending)
        last_saved = step
    finally:
      ckpts.wait()
      loop_time = time.time() - t_loop
      if progress is not None:
        progress.close()
      log.close()

  if stopped:  # (a request during the last step lets the run finish)
    raise UserError(f"interrupted at step {step}; checkpoint saved, run the same command to resume")
  summary: dict[str, Any] = {"workdir": workdir, "steps": step, f"{run.unit}_seen": step * tokens_per_step,
                             "wall_time_s": None,  # below: the whole command, final evaluation included
                             "loop_time_s": round(loop_time, 2),  # the steps, their compilation, evals, saves
                             "params": int(sum(x.size for x in jax.tree.leaves(state.params)))}
  if step >= cfg.train.steps:
    summary.update(_final_evaluation(run, run.task.model_params(state), step, last_eval, workdir))
  summary["best_checkpoint"] = ckpts.best_step()
  summary["latest_checkpoint"] = ckpts.latest_step()
  summary["wall_time_s"] = round(time.time() - t_start, 2)
  if is_main_process():
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  ckpts.close()
  return summary


def make_run(cfg: config_lib.Config, tokenizer: Optional[tokenizers.Tokenizer] = None, mesh=None,
             workdir: Optional[str] = None):
  """The run object of `cfg.task.kind`: `Run` for language modelling, `nlm_jax.tasks`' others.
  `workdir`: a trained run's directory, whose saved files (e.g. the label set) it reads."""
  if cfg.task.kind == "lm":
    return Run(cfg, tokenizer, mesh)
  from nlm_jax import tasks

  return tasks.make_run(cfg, tokenizer, mesh, workdir)


# ----------------------------------------------------------------------------- load a run


def load_run(workdir: str, step: Optional[int] = None, best: bool = False, mesh=None):
  """A trained run's `Run` and parameters, on this machine's devices (any mesh)."""
  workdir = os.path.abspath(workdir)
  if not os.path.exists(os.path.join(workdir, CONFIG_FILE)):
    raise UserError(f"no nlm-jax run in {workdir} (no {CONFIG_FILE})")
  cfg = config_lib.load_config(os.path.join(workdir, CONFIG_FILE), [])
  configure_runtime(cfg)
  cfg.mesh = config_lib.MeshConfig()  # evaluate on whatever devices are here
  if step is not None and not os.path.isdir(os.path.join(workdir, "checkpoints", str(step))):
    raise UserError(f"no checkpoint {step} in {workdir}/checkpoints")
  tokenizer = tokenizers.load(os.path.join(workdir, TOKENIZER_FILE))
  # Only the parameters are restored, so the batch may be re-cut for this machine's devices;
  # evaluation keeps the run's own evaluation batch size (padded rows are masked out).
  cfg.data.eval_batch_size = cfg.data.eval_rows
  n = jax.device_count()
  cfg.data.batch_size = -(-cfg.data.batch_size // n) * n
  run = make_run(cfg, tokenizer, mesh, workdir=workdir)
  params, step = ckpt_lib.read_params(workdir, step, run.task.abstract_state.params, best=best, require_best=best)
  return run, params, step
