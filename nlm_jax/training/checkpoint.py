"""Checkpoints with Orbax: train state, data-iterator state, resolved config and tokenizer.

    workdir/checkpoints/<step>/{state, data_iter, config, tokenizer}

Orbax writes a step into a temporary directory and renames it only once complete (after writing
its `commit_success.txt`), so a save cut short (a crash, a kill) never appears among `all_steps()`.
A step directory without that marker (a copy cut short, a hand-made directory) is refused with an
error naming it rather than taken for a checkpoint: resume always takes a whole checkpoint.
Kept: the last `keep` steps and the best by validation loss. Restoring onto another mesh (saved on
8 devices, read on 1) just passes the target shardings.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from nlm_jax.errors import UserError

COMMIT_MARKER = "commit_success.txt"  # written by Orbax just before the atomic rename


class Checkpoints:
  def __init__(self, workdir: str, keep: int = 2, read_only: bool = False):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    policy = policies.AnyPreservationPolicy([
        policies.LatestN(n=keep),
        policies.BestN(get_metric_fn=_val_loss, reverse=True, n=1, keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=_val_loss, best_mode="min",
                                           create=not read_only, read_only=read_only)
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
                "tokenizer": ocp.JsonCheckpointHandler(), "data_iter": grain.checkpoint.CheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    for step in self.manager.all_steps():
      path = os.path.join(self.directory, str(step))
      if not os.path.exists(os.path.join(path, COMMIT_MARKER)):
        self.manager.close()
        raise UserError(f"checkpoint {path} is incomplete (no {COMMIT_MARKER}: no finished save wrote it); "
                        f"move it out of {self.directory} and rerun")

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def best_step(self) -> Optional[int]:
    """The kept step with the lowest validation loss (None if no step has one)."""
    steps = [s for s in self.manager.all_steps() if (self.manager.metrics(s) or {}).get("val_loss") is not None]
    return min(steps, key=lambda s: self.manager.metrics(s)["val_loss"]) if steps else None

  def save(self, step: int, state: Any, data_iter, config: dict, tokenizer: dict,
           val_loss: Optional[float] = None, force: bool = True) -> None:
    items = {"state": ocp.args.PyTreeSave(state), "config": ocp.args.JsonSave(config),
             "tokenizer": ocp.args.JsonSave(tokenizer)}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    metrics = None if val_loss is None else {"val_loss": float(val_loss)}
    self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)

  def read_json(self, step: int, item: str) -> dict:
    restored = self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
    return restored[item]

  def restore(self, step: int, abstract_state: Any, data_iter=None) -> Any:
    """The state at `step`, laid out by the shardings in `abstract_state`; restores `data_iter`
    in place."""
    items = {"state": ocp.args.PyTreeRestore(abstract_state, restore_args=_restore_args(abstract_state))}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError) as e:
      raise UserError(f"checkpoint {self.directory}/{step} does not match this run's model or optimizer "
                      f"({str(e).splitlines()[0][:200]})") from None
    return restored["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def _val_loss(metrics: dict) -> float:
  return metrics["val_loss"]


def _restore_args(abstract: Any) -> Any:
  """Restore each array straight into its target sharding (any mesh: elastic restore)."""
  return jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape,
                                                     dtype=x.dtype), abstract)


def resolve(path: str) -> tuple[str, int]:
  """A run directory or a checkpoint step directory → (run directory, step). A run directory
  gives its best step if any has a validation loss, else its latest."""
  path = os.path.abspath(path)
  base = os.path.basename(path)
  if base.isdigit() and os.path.basename(os.path.dirname(path)) == "checkpoints":
    return os.path.dirname(os.path.dirname(path)), int(base)
  if not os.path.isdir(os.path.join(path, "checkpoints")):
    raise UserError(f"no nlm-jax checkpoints in {path}")
  ckpts = Checkpoints(path, read_only=True)
  step = ckpts.best_step()
  step = ckpts.latest_step() if step is None else step
  if step is None:
    raise UserError(f"no complete checkpoint in {path}/checkpoints")
  return path, step


def restore_params(run_dir: str, step: int, abstract_params: Any) -> Any:
  """Only the parameters of another run's checkpoint (for `init_from`), laid out as
  `abstract_params`; a UserError naming the first parameter whose shape differs."""
  ckpts = Checkpoints(run_dir, read_only=True)
  meta = ckpts.manager.item_metadata(step)["state"]
  saved = (meta.tree if hasattr(meta, "tree") else meta)["params"]
  flat_saved = dict(jax.tree_util.tree_flatten_with_path(saved)[0])
  flat_target = dict(jax.tree_util.tree_flatten_with_path(abstract_params)[0])
  for path, target in flat_target.items():
    name = jax.tree_util.keystr(path)
    if path not in flat_saved:
      raise UserError(f"init_from {run_dir}: it has no parameter {name} (a different architecture?)")
    if tuple(flat_saved[path].shape) != tuple(target.shape):
      raise UserError(f"init_from {run_dir}: parameter {name} has shape {tuple(flat_saved[path].shape)}, "
                      f"this model needs {tuple(target.shape)}")
  restored = ckpts.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item={"params": abstract_params},
      restore_args=_restore_args({"params": abstract_params}),
      partial_restore=True)))
  return restored["state"]["params"]
