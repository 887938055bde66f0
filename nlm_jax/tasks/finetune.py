"""Fine-tuning a pretrained network: which parameters are its body, their learning rates, and
freezing the body while a new head learns.

    body        the pretrained language model's parameters (all of them for `task.kind=lm`; the
                `body` subtree of a classifier, whose `head` is new, and with task.backward its
                `body_backward`: every rate, freezing and reinit below apply to both bodies)
    rates       head: optim.lr; body: optim.lr × finetune.body_lr_scale; with
                finetune.layer_lr_decay = d (ULMFiT's discriminative fine-tuning, Howard & Ruder
                2018: d = 2.6) the body's top group has that rate and each layer below it ÷ d
                (the embedding is the lowest layer, the output layer and final norm the top
                group; a classifier's body has no output layer, so its top recurrent layer gets
                the body's rate ÷ d and the head's is ÷ d above it, as in ULMFiT)
    freezing    finetune.freeze_body_steps = k: the body gets no update for k optimizer steps
    reinit      finetune.reinit = [group, ...]: these top-level groups of the body ('embed',
                'layer_0', ...) are not loaded and keep the run's own initialization
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

import jax

from nlm_jax.errors import UserError

# Model settings that change the computation but not the parameters: a fine-tuned run may set
# them differently from its pretrained run.
RUNTIME_MODEL_KEYS = ("dropout", "attn_dropout", "attention", "embed_method", "remat", "matmul_precision",
                      "dtype")


def _names(path) -> list[str]:
  return [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]


def _layer_group(names: list[str]) -> Optional[int]:
  """The depth of a body parameter: 0 for embeddings, l + 1 for layer l, None for what sits on top."""
  first = names[0] if names else ""
  if first in ("embed", "pos_embed", "C"):
    return 0
  if first == "H":  # the FNN's hidden layer
    return 1
  match = re.fullmatch(r"(?:layer|block)_(\d+)", first)
  if match:
    return int(match.group(1)) + 1
  if first == "blocks":
    raise UserError("finetune.layer_lr_decay needs a rate per layer: set model.scan_layers=false "
                    "(scanned layers share one parameter array)")
  return None


def lr_groups(cfg, model_cfg, head: Optional[str]):
  """`(labels, factors)` for `optim.make_optimizer`, or None when every rate is optim.lr."""
  f = cfg.finetune
  if f.body_lr_scale == 1.0 and f.layer_lr_decay is None:
    return None

  def group(path) -> str:
    names = _names(path)
    if head is not None:
      if names[0] == head:
        return "head"
      names = names[1:]
    if f.layer_lr_decay is None:
      return "body"
    depth = _layer_group(names)
    return "body_top" if depth is None else f"body_{depth}"

  n_layers = getattr(model_cfg, "n_layers", 1)  # the FNN: embedding 0, hidden layer 1
  factors = {"head": 1.0, "body": f.body_lr_scale, "body_top": f.body_lr_scale}
  if f.layer_lr_decay is not None:
    for depth in range(n_layers + 1):  # body_top is depth n_layers + 1
      factors[f"body_{depth}"] = f.body_lr_scale / f.layer_lr_decay ** (n_layers + 1 - depth)
  return (lambda params: jax.tree_util.tree_map_with_path(lambda p, _: group(p), params)), factors


def freeze(cfg, head: Optional[str]):
  """`(steps, mask_fn)` for the task's train step (mask_fn(params) → True on the body), or None."""
  k = cfg.finetune.freeze_body_steps
  if not k:
    return None
  if head is None:
    raise UserError("finetune.freeze_body_steps needs a new head to train while the body is frozen "
                    "(task.kind=classify)")
  return k, lambda params: jax.tree_util.tree_map_with_path(lambda p, _: _names(p)[0] != head, params)


def _body_of(params, body: Optional[str]):
  return params[body] if body is not None else params


def check_reinit(groups: list[str], params, body: Optional[str]) -> None:
  """A one-line error unless each of `groups` is a top-level group of the body in `params` (a
  tree of arrays or of their shapes; `body`: its key, None when the parameters are the body)."""
  tree = _body_of(params, body)
  missing = [g for g in groups if g not in tree]
  if missing:
    raise UserError(f"finetune.reinit: {missing[0]!r} is not a parameter group of the pretrained body "
                    f"(it has: {', '.join(sorted(tree))})")


def reinit(params, initial, groups: list[str], body: Optional[str]):
  """`params` (the pretrained network loaded) with the body's top-level parameter groups named in
  `groups` taken from `initial` (the run's own initialization). `body`: the key of the body in
  `params` (None: the parameters are the body)."""
  if not groups:
    return params
  check_reinit(groups, params, body)
  fresh = {**_body_of(params, body), **{g: _body_of(initial, body)[g] for g in groups}}
  return {**params, body: fresh} if body is not None else fresh


def model_difference(pretrained, now) -> Optional[str]:
  """The first structural setting in which two model configs differ, as 'model.key: a vs b'."""
  a, b = dataclasses.asdict(pretrained), dataclasses.asdict(now)
  if pretrained.arch != now.arch:
    return f"model.arch: {pretrained.arch!r} (pretrained) vs {now.arch!r} (now)"
  for key in sorted(set(a) | set(b)):
    if key not in RUNTIME_MODEL_KEYS and a.get(key) != b.get(key):
      return f"model.{key}: {a.get(key)!r} (pretrained) vs {b.get(key)!r} (now)"
  return None
