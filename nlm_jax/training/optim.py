"""Optimizers and learning-rate schedules, all composed from Optax transformations.

    θ ← θ − η_t · s_t · u_t

u_t is the update direction of the optimizer (g for SGD, the momentum trace for momentum /
Nesterov, m̂/(√v̂+ε) for Adam), η_t the schedule, s_t the plateau scale (×factor each time the
validation loss stops improving; 1 otherwise). Weight decay λ comes in two kinds:
  l2         g ← clip(g) + λθ before the optimizer: the gradient of (λ/2)‖θ‖² added to the loss's,
             after gradient clipping (as PyTorch's SGD/Adam weight_decay: the clip sees the data
             gradient only)
  decoupled  u ← u + λθ after it (AdamW, Loshchilov & Hutter 2019)
and a mask can exclude biases, normalization scales and embeddings from it.
"""

from __future__ import annotations

import optax
import jax

from nlm_jax.config import OptimConfig


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """η_t: constant, or linear warmup then cosine decay to `min_lr` at `decay_steps`."""
  if cfg.schedule == "warmup_cosine":
    decay_steps = cfg.decay_steps or total_steps
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
        decay_steps=max(decay_steps, cfg.warmup_steps + 1), end_value=cfg.min_lr)
  if cfg.warmup_steps:
    return optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
  return optax.constant_schedule(cfg.lr)


def decay_mask(exclude: list[str]):
  """Which parameters weight decay applies to: all but those of the excluded kinds.
  'bias': parameters named bias / b / out_bias; 'norm': LayerNorm scales and biases; 'embedding':
  embedding tables (nn.Embed)."""

  def excluded(path, leaf) -> bool:
    names = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
    leaf_name = names[-1] if names else ""
    in_norm = any(n.startswith("ln") or "norm" in n.lower() for n in names[:-1])
    if "norm" in exclude and in_norm:
      return True
    if "bias" in exclude and leaf_name in ("bias", "b", "out_bias"):
      return True
    if "embedding" in exclude and (leaf_name in ("embedding", "pos_embed")):
      return True
    return False

  return lambda params: jax.tree_util.tree_map_with_path(lambda p, x: not excluded(p, x), params)


def make_optimizer(cfg: OptimConfig, total_steps: int, lr_groups=None, freeze=None) -> optax.GradientTransformation:
  """The Optax chain for `cfg`; with `grad_accum` > 1 wrapped in `optax.MultiSteps`.

  `lr_groups`: (labels, {label: factor}) — `labels(params)` names each parameter's group, whose
  learning rate is η_t × factor (`optax.multi_transform` of `optax.scale` after the schedule:
  clipping and the optimizer's statistics stay those of the whole network). Fine-tuning uses it
  for the body's and the head's rates and ULMFiT's per-layer ones.

  `freeze`: (k, mask_fn), as `finetune.freeze` gives: the parameters where `mask_fn(params)` is
  True (a frozen body) have an optimizer state of their own that starts at optimizer step k
  (`optax.transforms.conditionally_transform`): Adam's bias correction then counts the body's
  steps from its unfreezing, as for a fresh optimizer, not from the run's start (with the shared
  count, its first updates after 1,000 frozen steps were 2-5x a fresh Adam's). The train step
  gives the frozen parameters zero gradients and keeps them exactly (`steps.LMTask`)."""
  mode = cfg.weight_decay_mode or ("decoupled" if cfg.name == "adamw" else "l2")
  mask = decay_mask(list(cfg.decay_exclude))
  parts = []
  if cfg.clip_norm:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  if cfg.weight_decay and mode == "l2":
    parts.append(optax.add_decayed_weights(cfg.weight_decay, mask))
  direction = None
  if cfg.name == "momentum":
    direction = optax.trace(decay=cfg.momentum, nesterov=False)
  elif cfg.name == "nesterov":
    direction = optax.trace(decay=cfg.momentum, nesterov=True)
  elif cfg.name in ("adam", "adamw"):
    direction = optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  if direction is not None and freeze is not None:
    k, frozen = freeze
    held = optax.transforms.conditionally_transform(direction, lambda step: step >= k)
    direction = optax.multi_transform({"held": held, "free": direction},
                                      lambda params: jax.tree.map(lambda m: "held" if m else "free", frozen(params)))
  if direction is not None:
    parts.append(direction)
  if cfg.weight_decay and mode == "decoupled":
    parts.append(optax.add_decayed_weights(cfg.weight_decay, mask))
  parts.append(optax.scale_by_learning_rate(schedule(cfg, total_steps)))
  if lr_groups is not None:
    labels, factors = lr_groups
    parts.append(optax.multi_transform({name: optax.scale(f) for name, f in factors.items()}, labels))
  tx = optax.chain(*parts)
  if cfg.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum)
  return tx


def plateau(cfg: OptimConfig) -> optax.GradientTransformationExtraArgs:
  """optax's reduce-on-plateau, fed the validation loss after each evaluation (not every step):
  its `scale` multiplies every update."""
  return optax.contrib.reduce_on_plateau(factor=cfg.plateau_factor, patience=cfg.plateau_patience,
                                         rtol=1e-9, atol=0.0)  # any improvement counts
