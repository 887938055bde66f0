"""Checkpoints with Orbax: train state, data-iterator state, resolved config and tokenizer.

    workdir/checkpoints/<step>/{state, data_iter, config, tokenizer}

Orbax writes a step into a temporary directory and renames it only once complete (after writing
its `commit_success.txt`), so a save cut short (a crash, a kill) never appears among `all_steps()`.
Before that rename, each step gets `sha256.json`: the SHA-256 of every file Orbax wrote for its
items. A step is restored only once its files match (`problem()`); a damaged or incomplete newest
step (flipped bytes, a deleted or truncated file, no commit marker) is passed over for the newest
intact one with a one-line warning naming what is wrong, and left where it is for inspection.
Kept: the last `keep` steps and the best by validation loss. Restoring onto another mesh (saved on
8 devices, read on 1) just passes the target shardings.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import time
from typing import Any, Callable, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from nlm_jax.errors import UserError, warn

COMMIT_MARKER = "commit_success.txt"  # written by Orbax just before the atomic rename
CHECKSUMS = "sha256.json"  # ours: {relative path: sha256} of every file under the step's items


def _file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _item_files(step_dir: str) -> list[str]:
  """Every file inside the step's item directories (state/, config/, ...), relative to `step_dir`.
  Files at the top level (Orbax's step metadata, commit marker, ours) are updated after we hash."""
  out = []
  for item in sorted(os.listdir(step_dir)):
    if os.path.isdir(os.path.join(step_dir, item)):
      for root, _, files in os.walk(os.path.join(step_dir, item)):
        out += [os.path.relpath(os.path.join(root, f), step_dir) for f in files]
  return sorted(out)


def write_checksums(step_dir: str) -> None:
  sums = {rel: _file_sha256(os.path.join(step_dir, rel)) for rel in _item_files(step_dir)}
  tmp = os.path.join(step_dir, CHECKSUMS + ".tmp")
  with open(tmp, "w") as f:
    json.dump(sums, f, indent=0, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, CHECKSUMS))


def step_problem(step_dir: str) -> Optional[str]:
  """What is wrong with a step directory (None: complete, and every file matches its checksum)."""
  if not os.path.isdir(step_dir):
    return "it is gone"
  if not os.path.exists(os.path.join(step_dir, COMMIT_MARKER)):
    return f"incomplete: no {COMMIT_MARKER}, no finished save wrote it"
  try:
    with open(os.path.join(step_dir, CHECKSUMS)) as f:
      sums = json.load(f)
  except FileNotFoundError:  # saved before checksums were kept: `newest_intact` warns
    return None
  except (ValueError, OSError) as e:
    return f"{CHECKSUMS} is unreadable ({e})"
  for rel, digest in sorted(sums.items()):
    path = os.path.join(step_dir, rel)
    try:
      if _file_sha256(path) != digest:
        return f"{rel} does not match its checksum (damaged)"
    except FileNotFoundError:
      return f"{rel} is missing"
    except OSError as e:
      return f"{rel} is unreadable ({e.strerror})"
  return None


def _unreadable_metrics(directory: str) -> list[tuple[str, str]]:
  """(step directory, what is wrong) of every step whose Orbax metrics file is not JSON: Orbax
  reads every step's when its CheckpointManager starts, and one damaged file stops it."""
  bad = []
  for path in sorted(glob.glob(os.path.join(directory, "*", "metrics", "metrics"))):
    if not os.path.basename(os.path.dirname(os.path.dirname(path))).isdigit():
      continue  # a save in progress (<step>.orbax-checkpoint-tmp*): not Orbax's to read yet
    try:
      with open(path, encoding="utf-8") as f:
        json.load(f)
    except FileNotFoundError:  # deleted since listed: a trainer pruning that step, not damage
      continue
    except (OSError, ValueError) as e:
      bad.append((os.path.dirname(os.path.dirname(path)), f"metrics/metrics is unreadable ({type(e).__name__})"))
  return bad


class Checkpoints:
  """`set_aside` (a trainer's): a folder where steps whose metrics Orbax cannot read are moved
  before it starts (a reader is told to move them itself: it changes nothing)."""

  def __init__(self, workdir: str, keep: int = 2, read_only: bool = False, set_aside: Optional[str] = None):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.set_aside: list[str] = []  # damaged steps moved away (here, or by `newest_intact`)
    for step_dir, problem in _unreadable_metrics(self.directory):
      if set_aside is None:
        raise UserError(f"checkpoint {step_dir} is damaged: {problem}; move it out of {self.directory} to use "
                        "the other checkpoints")
      self._move_aside(step_dir, set_aside, problem)
    policy = policies.AnyPreservationPolicy([
        policies.LatestN(n=keep),
        policies.BestN(get_metric_fn=_val_loss, reverse=True, n=1, keep_checkpoints_without_metrics=False),
    ])
    self._saving: Optional[int] = None
    self.vanished = False  # `newest_intact` saw a listed step disappear (a trainer pruning it)
    self.read_only = read_only
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, best_fn=_val_loss, best_mode="min", create=not read_only,
        read_only=read_only, async_options=ocp.AsyncOptions(post_finalization_callback=self._seal))
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
                "tokenizer": ocp.JsonCheckpointHandler(), "data_iter": grain.checkpoint.CheckpointHandler(),
                "log_window": ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def _seal(self) -> None:
    """Runs in Orbax's save thread once every item is written, before the commit marker and the
    rename: the checksums are part of the committed step."""
    if jax.process_index() != 0 or self._saving is None:
      return
    tmp = sorted(glob.glob(os.path.join(self.directory, f"{self._saving}.orbax-checkpoint-tmp*")))
    write_checksums(tmp[-1] if tmp else self.step_dir(self._saving))

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def problem(self, step: int) -> Optional[str]:
    return step_problem(self.step_dir(step))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def newest_intact(self, set_aside: Optional[str] = None) -> Optional[int]:
    """The newest step whose files are whole. Each damaged newer one gets a one-line warning
    naming what is wrong, and is left in place, or moved into `set_aside` (a trainer must not
    write over it); steps that vanish meanwhile (a trainer pruning) are passed over silently."""
    moved, found = False, None
    for step in sorted(self.manager.all_steps(), reverse=True):
      problem = self.problem(step)
      if problem not in (None, "it is gone") and self.read_only:
        time.sleep(0.2)  # a reader may have caught a running trainer deleting this step: look again
        problem = self.problem(step)
      if problem is None:
        found = step
        if not os.path.exists(os.path.join(self.step_dir(step), CHECKSUMS)):
          warn(f"checkpoint {self.step_dir(step)} has no {CHECKSUMS} (saved before nlm-jax kept checksums): "
               "its files are not verified")
        break
      if problem == "it is gone":
        self.vanished = True
        continue
      if set_aside is not None:
        self._move_aside(self.step_dir(step), set_aside, problem)
        moved = True
      else:
        warn(f"checkpoint {self.step_dir(step)} is not used: {problem}; it is left in place")
    if moved:
      self.manager.reload()
    return found

  def _move_aside(self, step_dir: str, set_aside: str, problem: str) -> None:
    os.makedirs(set_aside, exist_ok=True)
    name = os.path.basename(step_dir)
    target, n = os.path.join(set_aside, name), 1
    while os.path.exists(target):  # the same step damaged again
      target, n = os.path.join(set_aside, f"{name}.{n}"), n + 1
    try:
      os.rename(step_dir, target)
    except FileNotFoundError:  # another process of this run moved it first (a shared filesystem)
      target = os.path.join(set_aside, name)
    self.set_aside.append(target)
    warn(f"checkpoint {step_dir} is not used: {problem}; moved to {target}")

  def best_step(self) -> Optional[int]:
    """The kept step with the lowest validation loss (None if no step has one)."""
    steps = [s for s in self.manager.all_steps() if (self.manager.metrics(s) or {}).get("val_loss") is not None]
    return min(steps, key=lambda s: self.manager.metrics(s)["val_loss"]) if steps else None

  def save(self, step: int, state: Any, data_iter, config: dict, tokenizer: dict,
           val_loss: Optional[float] = None, force: bool = True, log_window: Optional[list] = None) -> None:
    """`log_window`: the (fetched) training metrics of the steps since the last training-log
    record, when the run stops between records: the resumed run's next record averages them too."""
    items = {"state": ocp.args.PyTreeSave(state), "config": ocp.args.JsonSave(config),
             "tokenizer": ocp.args.JsonSave(tokenizer)}
    if log_window:  # each number with its dtype: the next record's sums are then the same float32 sums
      plain = [{k: [np.asarray(v).item(), str(np.asarray(v).dtype)] for k, v in m.items()} for m in log_window]
      items["log_window"] = ocp.args.JsonSave({"metrics": plain})
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    metrics = None if val_loss is None else {"val_loss": float(val_loss)}
    self.wait()  # the previous save is finished (its checksums written for its step)
    self._saving = step
    try:
      self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)
    except Exception as e:  # disk full, permission, ...: the earlier steps are untouched
      raise self._failed(e) from None

  def log_window(self, step: int) -> list[dict]:
    """The training metrics a stop between log records left for the next record ([] if none)."""
    if not os.path.isdir(os.path.join(self.step_dir(step), "log_window")):
      return []
    return [{k: np.asarray(v, dtype) for k, (v, dtype) in m.items()}
            for m in self.read_json(step, "log_window")["metrics"]]

  def read_json(self, step: int, item: str) -> dict:
    restored = self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
    return restored[item]

  def restore(self, step: int, abstract_state: Any, data_iter=None, retired: Optional[Callable] = None) -> Any:
    """The state at `step`, laid out by the shardings in `abstract_state`; restores `data_iter`
    in place. A checkpoint written before the state had a field (`ema`, for a run without it)
    restores with that field None. `retired(names) -> bool` names parameters the model no longer
    has (a classifier's language-model output layer): a checkpoint that holds them besides all
    of this model's parameters restores without them (and their optimizer state); any other extra
    or missing parameter is a mismatch."""
    meta = self.manager.item_metadata(step)["state"]
    tree = meta.tree if hasattr(meta, "tree") else meta
    saved = set(tree.keys())
    fields = [f.name for f in dataclasses.fields(abstract_state)]
    absent = [f for f in fields if f not in saved and getattr(abstract_state, f) is None]
    item = {f: getattr(abstract_state, f) for f in fields if f not in absent}
    partial = retired is not None and _only_retired(tree.get("params", {}), abstract_state.params, retired)
    items = {"state": ocp.args.PyTreeRestore(item, restore_args=_restore_args(item), partial_restore=partial)}
    if data_iter is not None:
      own = os.path.join(self.step_dir(step), "data_iter",
                         f"process_{jax.process_index()}-of-{jax.process_count()}.json")
      if os.path.exists(own):
        items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
      else:
        self._restore_iterator_of_other_processes(step, data_iter)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError) as e:
      raise UserError(f"checkpoint {self.directory}/{step} does not match this run's model or optimizer "
                      f"({str(e).splitlines()[0][:200]})") from None
    except Exception as e:  # TensorStore's errors (a damaged file in a step saved before checksums)
      raise UserError(f"checkpoint {self.directory}/{step} cannot be read ({(str(e).splitlines() or [''])[0][:200]});"
                      f" move it out of {self.directory} to resume from an earlier one") from None
    return abstract_state.replace(**restored["state"], **{f: None for f in absent})

  def _restore_iterator_of_other_processes(self, step: int, data_iter) -> None:
    """A checkpoint saved by another number of processes: Grain keeps one iterator state per
    process, and this process's is not there. Every process's iterator is at the same place (each
    takes its rows of the same global batches), so any saved one is this process's."""
    saved = sorted(glob.glob(os.path.join(self.step_dir(step), "data_iter", "process_*-of-*.json")))
    states = []
    for path in saved:
      with open(path, encoding="utf-8") as f:
        states.append(f.read())
    if not states:
      raise UserError(f"checkpoint {self.step_dir(step)} holds no data-iterator state (data_iter/process_*.json)")
    if len(set(states)) > 1:
      raise UserError(f"checkpoint {self.step_dir(step)} was saved by {len(states)} processes whose data iterators "
                      f"differ; resume it with {len(states)} processes")
    data_iter.set_state(json.loads(states[0]))
    getattr(data_iter, "start_prefetch", lambda: None)()  # as Grain's own restore does

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # raised by the background save
      raise self._failed(e) from None

  def _failed(self, e: Exception) -> UserError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return UserError(f"saving checkpoint {self.step_dir(self._saving)} failed ({first}); the earlier checkpoints "
                     f"are intact: free disk space or make {self.directory} writable, then rerun the same "
                     "command to resume")

  def close(self) -> None:
    self.manager.close()


def _leaf_names(tree: Any) -> set[tuple[str, ...]]:
  return {tuple(str(getattr(k, "key", k)) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _only_retired(saved_params: Any, target_params: Any, retired: Callable) -> bool:
  """Whether the saved parameters are the target's plus at least one retired one, and nothing else."""
  saved, target = _leaf_names(saved_params), _leaf_names(target_params)
  extra = saved - target
  return bool(extra) and target <= saved and all(retired(names) for names in extra)


def _val_loss(metrics: dict) -> float:
  return metrics["val_loss"]


def _restore_args(abstract: Any) -> Any:
  """Restore each array straight into its target sharding (any mesh: elastic restore)."""
  return jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape,
                                                     dtype=x.dtype), abstract)


def resolve(path: str) -> tuple[str, Optional[int]]:
  """A run directory or a checkpoint step directory → (run directory, step). A run directory
  gives None: its best step if any has a validation loss, else its latest (see `read_params`)."""
  path = os.path.abspath(path)
  base = os.path.basename(path)
  if base.isdigit() and os.path.basename(os.path.dirname(path)) == "checkpoints":
    return os.path.dirname(os.path.dirname(path)), int(base)
  if not os.path.isdir(os.path.join(path, "checkpoints")):
    raise UserError(f"no nlm-jax checkpoints in {path}")
  return path, None


def all_finite(tree: Any) -> bool:
  return all(bool(jax.numpy.isfinite(x).all()) for x in jax.tree.leaves(tree))


def read_params(run_dir: str, step: Optional[int], abstract_params: Any, best: bool = False,
                attempts: int = 20, require_best: bool = False) -> tuple[Any, int]:
  """(parameters, step) of a run's checkpoint laid out as `abstract_params`: `step`, else the best
  (`best`, or a run dir given to `init_from`) or the latest intact one; with `require_best` (the
  CLI's --best) a run none of whose checkpoints has a val_loss is an error, not its latest. Safe
  while a trainer saves and prunes: a step that vanishes while it is read is passed over for the
  next pick."""
  last_listed = None
  for _ in range(attempts):
    chosen, ckpts = step, None
    try:
      ckpts = Checkpoints(run_dir, read_only=True)
      if chosen is None and best:
        chosen = ckpts.best_step()
        if chosen is None and require_best:
          raise UserError(f"--best: no checkpoint in {ckpts.directory} has a val_loss (none was saved at an "
                          "evaluation); pass --step, or leave --best out for the latest")
        if chosen is not None and ckpts.problem(chosen) not in (None, "it is gone"):
          warn(f"the best checkpoint {ckpts.step_dir(chosen)} is not used: {ckpts.problem(chosen)}")
          chosen = None
      if chosen is None:
        chosen = ckpts.newest_intact()
        listed = tuple(ckpts.manager.all_steps())
        changed, last_listed = listed != last_listed, listed
        if chosen is None and (ckpts.vanished or changed):
          # every listed step was pruned, or caught mid-deletion, while we looked (a trainer with
          # keep_checkpoints=1): list again, until two listings agree
          time.sleep(0.1)
          continue
        if chosen is None:
          raise UserError(f"no complete checkpoint in {ckpts.directory}")
      problem = ckpts.problem(chosen)
      if problem == "it is gone" and step is None:
        continue
      if problem is not None:
        raise UserError(f"checkpoint {ckpts.step_dir(chosen)} cannot be used: {problem}")
      params = _restore_params(ckpts, chosen, abstract_params, run_dir)
    except UserError:
      raise
    except Exception as e:  # Orbax / TensorStore errors have many types
      changed = chosen is None or step_problem(os.path.join(run_dir, "checkpoints", str(chosen))) is not None
      if step is None and changed:
        continue  # verified, then pruned by a running trainer while we read it: pick again
      where = os.path.join(run_dir, "checkpoints", str(chosen) if chosen is not None else "")
      raise UserError(f"checkpoint {where} cannot be read ({(str(e).splitlines() or [''])[0][:200]})") from None
    finally:
      if ckpts is not None:
        ckpts.close()
    if not all_finite(params):
      raise UserError(f"checkpoint {ckpts.step_dir(chosen)} holds NaN or Inf parameters; use an earlier "
                      "step (--step) or retrain")
    return params, chosen
  raise UserError(f"checkpoints in {run_dir}/checkpoints kept vanishing while read (a trainer pruning "
                  "them?); retry, or pass --step")


def _restore_params(ckpts: Checkpoints, step: int, abstract_params: Any, run_dir: str) -> Any:
  """Only the network of a checkpoint (its parameters' moving average when it keeps one:
  optim.ema_decay), laid out as `abstract_params`; a UserError naming the first parameter whose
  shape differs (another architecture, for `init_from`)."""
  meta = ckpts.manager.item_metadata(step)["state"]
  tree = meta.tree if hasattr(meta, "tree") else meta
  key = "ema" if tree.get("ema") else "params"
  saved = tree[key]
  flat_saved = dict(jax.tree_util.tree_flatten_with_path(saved)[0])
  flat_target = dict(jax.tree_util.tree_flatten_with_path(abstract_params)[0])
  for path, target in flat_target.items():
    name = jax.tree_util.keystr(path)
    if path not in flat_saved:
      raise UserError(f"checkpoint {ckpts.step_dir(step)}: it has no parameter {name} (a different "
                      "architecture?)")
    if tuple(flat_saved[path].shape) != tuple(target.shape):
      raise UserError(f"checkpoint {ckpts.step_dir(step)}: parameter {name} has shape "
                      f"{tuple(flat_saved[path].shape)}, this model needs {tuple(target.shape)}")
  restored = ckpts.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item={key: abstract_params},
      restore_args=_restore_args({key: abstract_params}),
      partial_restore=True)))
  return restored["state"][key]
