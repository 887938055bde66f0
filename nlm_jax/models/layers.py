"""Pieces shared by every architecture: the output record, initializers with logical axis names,
and the config checks.

Every parameter is created through `param_init(init, axes)`, which attaches logical axis names
(`'vocab'`, `'embed'`, `'hidden'`, `'heads'`, `'kv'`, `'mlp'`, ...). `nlm_jax.parallel` maps those
names to mesh axes in one table; the model code never mentions devices.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from nlm_jax import parallel

Array = jax.Array
EMBED_METHODS = ("auto", "gather", "one_hot")
MATMUL_PRECISIONS = (None, "default", "high", "highest")
# Largest vocabulary for which `embed_method='auto'` contracts a one-hot matrix on an accelerator:
# its cost, 2·N·|V|·D FLOPs forward and backward, stays small beside the step's own matmuls.
ONE_HOT_MAX_VOCAB = 4096


class LMOutput(NamedTuple):
  """What every language model returns.

  logits: (B, T, V) next-token logits; `logits[:, t]` scores token t+1 given tokens ≤ t (None
    from a call with `logits=False`, which neither computes nor creates the output layer).
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
  """Shards an activation by its logical axis names, as `parallel.spec_for` shards a parameter,
  inside a (data, fsdp, tensor) mesh context (`jax.sharding.use_abstract_mesh`: the train and
  evaluation steps enter one); elsewhere x unchanged.

  Without them XLA's propagation alone lays out the activations, and on fsdp and tensor meshes it
  reshards them between layers: a 6-layer Transformer's train step sent 3–9× the bytes between
  devices (benchmarks/collectives.py).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or set(mesh.axis_names) != set(parallel.MESH_AXES):  # someone else's mesh: no hint
    return x
  return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, parallel.spec_for(x.shape, axes, mesh)))


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


def embed_method(method: str, vocab_size: int, backend: Optional[str] = None) -> str:
  """The embedding computation `'auto'` stands for: a one-hot contraction on GPU/TPU for
  vocabularies up to ONE_HOT_MAX_VOCAB, a gather (jnp.take) otherwise.

  Why: the gather's gradient is a scatter-add into E. On a GPU its atomics serialize on frequent
  tokens, so the step's cost depends on the text (measured on an H100: 9.9 ms on uniform random ids,
  30.7 ms on Tiny Shakespeare); the one-hot product's gradient, onehot(w)ᵀ g, is a dense matmul
  whose cost and summation order depend on shapes only (8.8 ms on both). On a CPU the scatter is a
  plain loop, and a one-hot product over a large vocabulary costs more than it saves.
  """
  if method != "auto":
    return method
  backend = backend or jax.default_backend()
  return "one_hot" if backend in ("gpu", "cuda", "rocm", "tpu") and vocab_size <= ONE_HOT_MAX_VOCAB else "gather"


class Embed(nn.Module):
  """Rows of E ∈ R^{|V|×D} for token ids, x = E[w], and the tied output projection x Eᵀ.

  One layer for every model's input embedding. `method` picks how E[w] is computed: `'gather'`
  (jnp.take), `'one_hot'` (onehot(w) E at exact float32 precision: the same values, a
  data-independent dense gradient) or `'auto'` (see `embed_method`). Parameter: 'embedding'
  (|V|, D), as nn.Embed's, so checkpoints do not depend on the method.
  """

  num_embeddings: int
  features: int
  embedding_init: nn.initializers.Initializer
  axes: tuple[str, str] = ("vocab", "embed")
  method: str = "auto"
  dtype: Any = jnp.float32  # of the vectors returned (and of the attend product)
  param_dtype: Any = jnp.float32

  def setup(self):
    self.embedding = self.param("embedding", param_init(self.embedding_init, self.axes),
                                (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, ids: Array) -> Array:
    """ids (...,) int → (..., D) in `dtype`."""
    E_VxD = self.embedding
    if embed_method(self.method, self.num_embeddings) == "one_hot":
      onehot = jax.nn.one_hot(ids, self.num_embeddings, dtype=E_VxD.dtype)
      # HIGHEST: a TF32/bf16-pass product would round the rows it selects.
      x = jnp.einsum("...v,vd->...d", onehot, E_VxD, precision=jax.lax.Precision.HIGHEST)
    else:
      x = jnp.take(E_VxD, ids, axis=0)
    return x.astype(self.dtype)

  def attend(self, x: Array, compute_dtype: Any = None) -> Array:
    """x Eᵀ: (..., D) → (..., |V|), the logits of a tied output layer: operands in `compute_dtype`
    (default `dtype`), accumulated and returned in `dtype`."""
    cd = self.dtype if compute_dtype is None else compute_dtype
    return jnp.einsum("...d,vd->...v", x.astype(cd), self.embedding.astype(cd), preferred_element_type=self.dtype)


@contextlib.contextmanager
def matmul_precision(precision: Optional[str]):
  """Default precision of the float32 matrix products traced inside (`None`: the backend's own,
  TF32 on Ampere/Hopper GPUs; 'highest': exact float32). Gradients inherit it."""
  if precision is None:
    yield
  else:
    with jax.default_matmul_precision(precision):
      yield


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
  require(cfg.embed_method in EMBED_METHODS, "embed_method", cfg.embed_method,
          f"allowed: {', '.join(EMBED_METHODS)}")
  require(cfg.matmul_precision in MATMUL_PRECISIONS, "matmul_precision", cfg.matmul_precision,
          "allowed: null (the backend's default), default, high, highest")


def positive(cfg: Any, *fields: str) -> None:
  for field in fields:
    value = getattr(cfg, field)
    require(isinstance(value, int) and value > 0, field, value, "must be a positive integer")
