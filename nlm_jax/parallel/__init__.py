"""Sharding over a device mesh: one table maps the models' logical axis names to mesh axes.

Mesh axes (sizes from the config `mesh.data`, `mesh.fsdp`, `mesh.tensor`; −1 = the rest):

  data    the batch is split over it; parameters are replicated along it (data parallelism)
  fsdp    the batch is split over it too, and so are parameters and optimizer state, along their
          'embed'-like dimension; XLA all-gathers a weight just before it is used (ZeRO-3 / FSDP)
  tensor  attention heads, MLP hidden units, RNN/LSTM gate units and the vocabulary are split
          over it (Megatron-style tensor parallelism); activations are exchanged inside a layer

Data, FSDP and tensor parallelism are therefore configuration, not code: the same jitted step
runs on any mesh, and XLA inserts the collectives.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from nlm_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # the mesh axes the batch dimension is split over

# Logical axis name → mesh axis (None: replicated). The only place parameters meet devices.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH),
    ("length", None),
    ("embed_act", None),  # the model dimension of activations
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("window", "fsdp"),  # FNN: the (n−1)·m concatenated embeddings
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("hidden", "tensor"),  # RNN/LSTM units (outputs of W, U) and the FNN tanh units
    ("hidden_in", "fsdp"),  # RNN/LSTM: the input side of U
    ("gates", None),
    ("context", None),
    ("norm", None),
    ("layers", None),  # the stacked-layer axis of nn.scan
)


def resolve_mesh_shape(sizes: dict[str, int], n_devices: int) -> tuple[int, ...]:
  """Mesh sizes with −1 filled in; a UserError when they do not multiply to `n_devices`."""
  shape = [sizes[a] for a in MESH_AXES]
  free = [i for i, s in enumerate(shape) if s == -1]
  if len(free) > 1:
    raise UserError(f"mesh: only one axis may be -1, got {dict(zip(MESH_AXES, shape))}")
  fixed = math.prod(s for s in shape if s != -1)
  if free:
    if n_devices % fixed:
      raise UserError(f"mesh: {n_devices} devices do not divide into the fixed axes "
                      f"{ {a: s for a, s in zip(MESH_AXES, shape) if s != -1} } (product {fixed})")
    shape[free[0]] = n_devices // fixed
  if math.prod(shape) != n_devices:
    raise UserError(f"mesh: data×fsdp×tensor = {'×'.join(map(str, shape))} = {math.prod(shape)} "
                    f"but there are {n_devices} devices")
  return tuple(shape)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over all devices of all processes (or `devices`)."""
  devices = list(devices) if devices is not None else jax.devices()
  shape = resolve_mesh_shape({"data": data, "fsdp": fsdp, "tensor": tensor}, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _mesh_axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def spec_for(shape: Sequence[int], logical: Sequence[str | None] | None, mesh: Mesh) -> P:
  """The PartitionSpec of an array with these logical axis names under `RULES`.

  A dimension that its mesh axes do not divide (a vocabulary of 65 over 8 devices, say) is
  replicated instead, and a mesh axis is used at most once per array.
  """
  if logical is None:
    return P()
  table = dict(RULES)
  used: set[str] = set()
  out = []
  for dim, name in zip(shape, logical):
    axes = table.get(name) if name is not None else None
    flat = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    flat = tuple(a for a in flat if a not in used and mesh.shape[a] > 1)
    if not flat or dim % _mesh_axis_size(mesh, flat):
      out.append(None)
      continue
    used.update(flat)
    out.append(flat[0] if len(flat) == 1 else flat)
  return P(*out)


def tree_shardings(abstract_boxed: Any, mesh: Mesh) -> Any:
  """NamedShardings for a pytree whose leaves may carry `nn.Partitioned` logical names
  (the output of `jax.eval_shape` of an init function); unnamed leaves are replicated."""

  def one(leaf):
    if isinstance(leaf, nn.Partitioned):
      value = leaf.value
      names = leaf.names
      if not hasattr(value, "shape"):  # a box around no array: optax's MaskedNode (multi_transform)
        return value
    else:
      value, names = leaf, None
    shape = getattr(value, "shape", ())
    return NamedSharding(mesh, spec_for(shape, names, mesh) if names else P())

  return jax.tree.map(one, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over data×fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH))


def check_batch(batch_size: int, mesh: Mesh, what: str = "data.batch_size") -> None:
  n = _mesh_axis_size(mesh, BATCH)
  if batch_size % n:
    raise UserError(f"{what}={batch_size} does not divide over the mesh's data×fsdp = {n} devices")


# The architectures whose train step all-gathers the parameters' fsdp dimensions first
# (`LMTask`'s default for them, `gathers_fsdp`). XLA's SPMD partitioner (jax 0.10.2; with Shardy and without)
# miscompiles the gradient of the recurrent pattern h @ U, h's units split over tensor and U's
# input side over fsdp, once data, fsdp and tensor are all > 1: the loss is right, the gradients
# are not (a plain-JAX reproduction, tanh(tanh(x @ U) @ U), is off by 27% of the gradient's size on
# a 2×2×2 mesh and exact on 1×2×2 and 2×2×1). Gathered first, U meets h as on a data×tensor mesh.
# A recurrent layer uses all of U at every time step anyway; the Transformer and the FNN are
# exact without it and keep XLA's own placement of FSDP's gathers.
GATHER_FSDP_ARCHS = ("rnn", "lstm")


def gathers_fsdp(model) -> bool:
  """Whether a model's train step must gather its parameters' fsdp dimensions (GATHER_FSDP_ARCHS):
  a language model by its `cfg`, a task's network (a classifier) by its body's `body_cfg`."""
  cfg = getattr(model, "cfg", None) or getattr(model, "body_cfg", None)
  return getattr(cfg, "arch", None) in GATHER_FSDP_ARCHS


def without_axis(shardings, axis: str):
  """The NamedShardings of a tree with mesh axis `axis` taken out of every spec (those dimensions
  replicated over it): e.g. FSDP's parameters all-gathered for use."""

  def one(sh: NamedSharding) -> NamedSharding:
    dims = []
    for d in sh.spec:
      kept = tuple(a for a in ((d,) if isinstance(d, str) else (d or ())) if a != axis)
      dims.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return NamedSharding(sh.mesh, P(*dims))

  return jax.tree.map(one, shardings)


def padded_rows(rows: int, mesh: Mesh) -> int:
  """`rows` (an evaluation batch's) rounded up to a multiple of the batch's shards and of the
  processes, so every device and every process holds whole rows (the extra rows are padding)."""
  n = math.lcm(_mesh_axis_size(mesh, BATCH), jax.process_count())
  return -(-rows // n) * n


def process_rows(batch_size: int, mesh: Mesh) -> slice:
  """The rows of a global batch that this process loads: those its devices hold under
  `batch_sharding(mesh)` (all of them where the batch is not split over processes, e.g. a tensor
  axis that spans hosts)."""
  spans = [idx[0].indices(batch_size)[:2]
           for idx in batch_sharding(mesh).addressable_devices_indices_map((batch_size,)).values()]
  start, stop = min(a for a, _ in spans), max(b for _, b in spans)
  if sum(b - a for a, b in set(spans)) != stop - start:
    raise UserError(f"this process's devices hold rows that are not one block of the batch: {sorted(set(spans))}")
  return slice(start, stop)


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding, batch_size: int) -> dict[str, jax.Array]:
  """This process's rows → global arrays laid out by `sharding`."""
  return {k: jax.make_array_from_process_local_data(sharding, v, (batch_size, *v.shape[1:]))
          for k, v in local.items()}


def maybe_initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                                 process_id: int | None, cpu_collectives: str = "gloo",
                                 initialize: bool = False) -> bool:
  """Calls `jax.distributed.initialize` when the run spans several processes.

  `initialize=True` (config `distributed.initialize=true`) always calls it, and JAX then finds
  the cluster itself on TPU pod slices, SLURM and Open MPI. Otherwise it is called when the three
  explicit keys (or `NLM_JAX_COORDINATOR`, `NLM_JAX_NUM_PROCESSES`, `NLM_JAX_PROCESS_ID`) say there
  are several processes. Returns whether it initialized.
  """
  coordinator_address = coordinator_address or os.environ.get("NLM_JAX_COORDINATOR")
  if num_processes is None and "NLM_JAX_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["NLM_JAX_NUM_PROCESSES"])
  if process_id is None and "NLM_JAX_PROCESS_ID" in os.environ:
    process_id = int(os.environ["NLM_JAX_PROCESS_ID"])
  multi = (num_processes or 1) > 1 or coordinator_address is not None
  if not (multi or initialize):
    return False
  if jax.distributed.is_initialized():
    return True
  if cpu_collectives:  # only used by the CPU backend
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)
  return True
