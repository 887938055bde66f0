"""Pieces shared by every architecture: the output record, initializers with logical axis names,
and the config checks.

Every parameter is created through `param_init(init, axes)`, which attaches logical axis names
(`'vocab'`, `'embed'`, `'hidden'`, `'heads'`, `'kv'`, `'mlp'`, ...). `nlm_jax.parallel` maps those
names to mesh axes in one table; the model code never mentions devices.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


class LMOutput(NamedTuple):
  """What every language model returns.

  logits: (B, T, V) next-token logits; `logits[:, t]` scores token t+1 given tokens ≤ t.
  carry: the state to pass to the next call (recurrent state, FNN window, or KV cache).
  hidden: (B, T, D) final hidden states (before the output layer), for task heads.
  """

  logits: Array
  carry: Any
  hidden: Array


def param_init(init: nn.initializers.Initializer, axes: tuple[str | None, ...]):
  """`init` with logical axis names attached, one per dimension of the parameter."""
  return nn.with_logical_partitioning(init, axes)


def uniform(scale: float) -> nn.initializers.Initializer:
  """U(−scale, scale), PyTorch's default for embeddings and recurrent weights."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -scale, scale)

  return init


def constrain(x: Array, axes: tuple[str | None, ...]) -> Array:
  """Sharding hint for an activation by logical axis names (a no-op outside a rules context)."""
  return nn.with_logical_constraint(x, axes)


class Affine(nn.Module):
  """y = x W + b over the last axis, with nn.Dense's parameters ('kernel' (in, out), 'bias' (out,)),
  computed as one matrix product [x, 1] [W; b].

  Why not nn.Dense: XLA's CPU backend runs the bias broadcast-add and the bias gradient (a column
  sum over the N×V logits) as separate passes, and the column sum is pathologically slow there:
  for a 33k-word output layer it took 280 ms of a 580 ms LSTM training step. As part of the
  product, the bias gradient is one row of the kernel gradient's matrix product.
  """

  features: int
  axes: tuple[str | None, str | None]
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    W = self.param("kernel", param_init(self.kernel_init, self.axes), (x.shape[-1], self.features),
                   self.param_dtype)
    b = self.param("bias", param_init(self.bias_init, self.axes[1:]), (self.features,), self.param_dtype)
    x1 = jnp.concatenate([x.astype(self.dtype), jnp.ones(x.shape[:-1] + (1,), self.dtype)], axis=-1)
    return x1 @ jnp.concatenate([W, b[None]], axis=0).astype(self.dtype)


# ----------------------------------------------------------------------------- config checks


def require(ok: bool, field: str, value: Any, allowed: str) -> None:
  """Raises a ValueError naming the field, its value and what is allowed."""
  if not ok:
    raise ValueError(f"invalid model config: {field}={value!r}; {allowed}")


def check_common(cfg: Any) -> None:
  """Checks the fields every architecture config has."""
  require(isinstance(cfg.vocab_size, int) and cfg.vocab_size > 0, "vocab_size", cfg.vocab_size,
          "must be a positive integer")
  require(isinstance(cfg.dropout, (int, float)) and 0.0 <= cfg.dropout < 1.0, "dropout", cfg.dropout,
          "must be a number in [0, 1)")
  for field in ("dtype", "param_dtype"):
    value = getattr(cfg, field)
    require(value in ("float32", "bfloat16", "float16", "float64"), field, value,
            "allowed: float32, bfloat16, float16, float64")


def positive(cfg: Any, *fields: str) -> None:
  for field in fields:
    value = getattr(cfg, field)
    require(isinstance(value, int) and value > 0, field, value, "must be a positive integer")
