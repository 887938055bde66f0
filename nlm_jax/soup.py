"""Model soups (Wortsman et al. 2022): several trained runs' parameters averaged into one network.

    θ_soup = (1/n) Σᵢ θᵢ        (the uniform soup: every run counts alike, none is picked on the
                                 data it is scored on)

The average is one network of the members' architecture, at the cost of one at inference; an
ensemble (`nlm_jax.tasks.classify.ensemble`) averages n networks' outputs instead. A soup is only
as good as its members share one basin of the loss: runs fine-tuned from one pretrained network,
and with `init_seed` from one head too, differing in data order and dropout (`seed`).

`check` refuses runs that are not one network: another task kind, tokenizer, model or reading of
the text (pooling, prefix-LM mask, backward body, length), other classes, or other parameter
shapes; each a one-line error naming the first difference.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nlm_jax import config as config_lib
from nlm_jax.errors import UserError

# task.* keys that change the function a network computes (the rest change training or decoding)
NETWORK_TASK_KEYS = ("kind", "pooling", "prefix_lm", "backward", "max_len", "text_field", "source_lang",
                     "target_lang")


def _network_config(run) -> dict[str, Any]:
  from nlm_jax.training import trainer

  c = config_lib.to_dict(run.cfg)  # in the order a difference is named: the first is the cause
  return {**{f"task.{k}": c["task"][k] for k in NETWORK_TASK_KEYS}, "model": trainer._resolved_model(c["model"]),
          "tokenizer": run.tokenizer.to_dict(), "classes": getattr(run, "labels", None)}


def _difference(want: dict, got: dict) -> str | None:
  """The first setting of `_network_config` in which two runs differ (a tokenizer by its key only:
  its vocabulary is no message)."""
  from nlm_jax.training import trainer

  for key in want:
    if key == "tokenizer":
      name = next((k for k in sorted(set(want[key]) | set(got[key])) if want[key].get(k) != got[key].get(k)), None)
      if name is not None:
        return f"tokenizer.{name} (another tokenizer or vocabulary)"
    elif diff := trainer._first_difference(want[key], got[key], key, ("", "")):
      return diff
  return None


def _shapes(params) -> dict[str, tuple]:
  return {jax.tree_util.keystr(path): (x.shape, str(x.dtype))
          for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def check(members: list) -> None:
  """`members`: [(name, run, params), ...], at least two, that must be one network."""
  if len(members) < 2:
    raise UserError("a soup needs at least two runs (repeat --workdir)")
  first, run0, params0 = members[0]
  want, shapes0 = _network_config(run0), _shapes(params0)
  for name, run, params in members[1:]:
    diff = _difference(want, _network_config(run))
    if diff:
      raise UserError(f"{name} and {first} are not one network ({diff}): they cannot be averaged")
    shapes = _shapes(params)
    if shapes != shapes0:
      where = next(k for k in sorted(set(shapes0) | set(shapes)) if shapes0.get(k) != shapes.get(k))
      raise UserError(f"{name} and {first} have other parameters ({where}): they cannot be averaged")


def average(params: list) -> Any:
  """The parameters' elementwise mean, summed in the members' order in float32 (then cast back)."""

  def mean(*xs):
    total = xs[0].astype(jnp.float32)
    for x in xs[1:]:
      total = total + x.astype(jnp.float32)
    return (total / np.float32(len(xs))).astype(xs[0].dtype)

  return jax.jit(lambda trees: jax.tree.map(mean, *trees))(params)
