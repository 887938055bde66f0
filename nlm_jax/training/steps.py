"""The train state and the pure, jitted train and eval steps of the language-modelling task.

    train_step(state, batch) -> (state, metrics)        one micro-batch: ∇ of mean NLL, Optax update
    eval_step(params, carry, batch) -> (carry, metrics)  summed NLL and token count

Both are compiled once with explicit in/out shardings over the mesh (the trivial mesh on one
device), and the state is donated, so the step updates parameters in place. Randomness (dropout)
comes from `fold_in(key, step)`: a resumed run continues the same stream of keys.

With `ema_decay` = β (Polyak averaging, as TensorFlow's ExponentialMovingAverage with
num_updates), the state also keeps an exponential moving average of the parameters, updated after
each optimizer step t = 1, 2, ...:

    ema ← ema + (1 − d_t) · (params − ema),   d_t = min(β, (1 + t) / (10 + t)),   ema_0 = params_0

(the ramp keeps the average of the first steps from clinging to the initialization). It is what
`model_params(state)` returns: the network that evaluation, checkpoints' readers and `init_from`
use; training keeps updating `params`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nlm_jax import objectives, parallel

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  step: Array  # micro-batches taken (int32); optimizer steps = step // grad_accum
  params: Any
  opt_state: Any
  plateau: Any  # optax reduce_on_plateau state: `scale` multiplies every update
  key: Array  # uint32 key data of the run's base PRNG key
  carry: Any  # truncated-BPTT state carried between stream batches (None for windows)
  ema: Any = None  # the moving average of params (optim.ema_decay), or None


def reset_carry(carry, initial, reset_B: Array):
  """Rows with reset=True start from the initial state again (a new epoch of the streams)."""

  def one(c, c0):
    r = reset_B.reshape((-1,) + (1,) * (c.ndim - 1))
    return jnp.where(r, c0.astype(c.dtype), c)

  return jax.tree.map(one, carry, initial)


def config_options(cfg) -> dict[str, Any]:
  """The keyword arguments of a task (LMTask or a subclass) that the run's config sets alike for
  every task kind: gradient accumulation, Polyak averaging, activation sharding."""
  return {"grad_accum": cfg.optim.grad_accum, "ema_decay": cfg.optim.ema_decay,
          "activation_sharding": cfg.mesh.activation_sharding}


class LMTask:
  """Next-token prediction with any of the four models, on a mesh.

  Other tasks (nlm_jax.tasks) subclass it: they change `batch_keys` and `_objective` (and the
  evaluation metrics), and keep the state, its sharding, the update and the finiteness check.

  `freeze`: (steps, mask_fn) — the parameters where `mask_fn(params)` (a pytree of bools) is
  True get no gradient and stay bit-identical for the first `steps` optimizer steps (fine-tuning
  a pretrained body under a new head).

  `gather_fsdp`: the train step all-gathers the parameters' fsdp-sharded dimensions before the
  forward pass; None (the default): where the model's architecture needs it
  (`parallel.gathers_fsdp`: the RNN and LSTM, whose gradients XLA gets wrong otherwise).

  `activation_sharding`: the train and evaluation steps are traced in the mesh's context, where
  the models' activation constraints (`layers.constrain`) apply; False leaves the activations'
  layouts to XLA's propagation (the config's `mesh.activation_sharding`).
  """

  batch_keys: tuple[str, ...] = ("inputs", "targets", "mask", "reset")

  def __init__(self, model: nn.Module, tx: optax.GradientTransformation,
               plateau: optax.GradientTransformationExtraArgs, mesh: Mesh, batch_size: int,
               carry_state: bool, example_len: int, grad_accum: int = 1, freeze=None,
               ema_decay: float | None = None, gather_fsdp: bool | None = None,
               activation_sharding: bool = True):
    self.model, self.tx, self.plateau, self.mesh = model, tx, plateau, mesh
    self.batch_size, self.carry_state = batch_size, carry_state
    self.grad_accum, self.freeze, self.ema_decay = grad_accum, freeze, ema_decay
    self.activation_sharding = activation_sharding
    self.example = jnp.zeros((1, example_len), jnp.int32)
    self.batch_sharding = parallel.batch_sharding(mesh)
    self.replicated = NamedSharding(mesh, P())
    abstract = jax.eval_shape(self._init_boxed, jax.random.key_data(jax.random.key(0)))
    self.state_sharding = parallel.tree_shardings(abstract, mesh)
    if gather_fsdp is None:
      gather_fsdp = parallel.gathers_fsdp(model)
    self.gathered = parallel.without_axis(self.state_sharding.params, "fsdp") if gather_fsdp else None
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(abstract),
        self.state_sharding)
    batch_sh = {k: self.batch_sharding for k in self.batch_keys}
    self.init = jax.jit(lambda k: nn.unbox(self._init_boxed(k)), out_shardings=self.state_sharding)
    # One device: nothing to lay out, and the program stays exactly what it was without constraints
    in_mesh = self._in_mesh if activation_sharding and mesh.size > 1 else (lambda fn: fn)
    self.train_step = jax.jit(in_mesh(self._train_step), in_shardings=(self.state_sharding, batch_sh),
                              out_shardings=(self.state_sharding, self.replicated), donate_argnums=0)
    # The eval carry's batch size may differ from training's: XLA picks its layout.
    self._eval_step_jit = jax.jit(in_mesh(self._eval_step),
                                  in_shardings=(self.state_sharding.params, None, batch_sh),
                                  out_shardings=(None, self.replicated))
    self.update_plateau = jax.jit(self._update_plateau, donate_argnums=0,
                                  in_shardings=(self.state_sharding, self.replicated),
                                  out_shardings=self.state_sharding)

  # ------------------------------------------------------------------------- state

  def _in_mesh(self, fn):
    """fn, traced with the mesh as the context of `layers.constrain`."""

    @functools.wraps(fn)  # the jitted program keeps fn's name and argument names (profiles, dumps)
    def traced(*args):
      with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
        return fn(*args)

    return traced

  def _init_boxed(self, key_data: Array) -> TrainState:
    """The initial state with logical-axis boxes on parameters (and on optimizer moments)."""
    key = jax.random.wrap_key_data(key_data)
    init_key, run_key = jax.random.split(key)
    params = self.model.init(init_key, self.example)["params"]
    carry = self.model.initial_carry(self.batch_size) if self.carry_state else None
    if carry is not None:
      carry = jax.tree.map(lambda c: nn.Partitioned(c, ("batch",) + (None,) * (c.ndim - 1)), carry)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                      plateau=self.plateau.init(nn.unbox(params)), key=jax.random.key_data(run_key),
                      carry=carry, ema=params if self.ema_decay is not None else None)

  @staticmethod
  def model_params(state: TrainState):
    """The parameters that are the trained network: the moving average when there is one."""
    return state.params if state.ema is None else state.ema

  def initial_carry(self, batch_size: int):
    return self.model.initial_carry(batch_size)

  # ------------------------------------------------------------------------- steps

  def _objective(self, params, batch, carry, key, deterministic: bool):
    """(summed loss, count, new carry, other summed metrics) of a batch: here the next-token NLL."""
    rngs = None if deterministic else {"dropout": key}
    out = self.model.apply({"params": params}, batch["inputs"], carry, deterministic=deterministic,
                           rngs=rngs)
    nll_sum, count = objectives.next_token_nll(out.logits, batch["targets"], batch["mask"])
    return nll_sum, count, out.carry, {}

  def eval_step(self, params, carry, batch):
    """(new carry, summed metrics) of an evaluation batch (compiled). In a multi-process run it
    returns once the batch is computed: independent evaluation batches in flight together
    deadlocked two processes' CPU collectives (Gloo) inside an all-reduce."""
    out = self._eval_step_jit(params, carry, batch)
    return jax.block_until_ready(out) if jax.process_count() > 1 else out

  def train_scores(self, metrics: list[dict]) -> dict:
    """Numbers of the task's own for the training log, from the (fetched) metrics of the
    micro-batches since the last log: none for language modelling (train_loss says it all)."""
    return {}

  def _eval_metrics(self, params, carry, batch):
    """(new carry, summed metrics) of an evaluation batch, in eval mode."""
    nll_sum, count, new_carry, extra = self._objective(params, batch, carry, None, deterministic=True)
    return new_carry, {"nll_sum": nll_sum, "count": count, **extra}

  def _train_step(self, state: TrainState, batch: dict[str, Array]):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    carry = None
    if self.carry_state:
      carry = reset_carry(state.carry, self.initial_carry(self.batch_size), batch["reset"])

    def loss_fn(params):
      if self.gathered is not None:
        params = jax.lax.with_sharding_constraint(params, self.gathered)
      loss_sum, count, new_carry, extra = self._objective(params, batch, carry, key, deterministic=False)
      return loss_sum / count, (loss_sum, count, new_carry, extra)

    (_, (nll_sum, count, new_carry, extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    frozen = None
    if self.freeze is not None and self.freeze[0] > 0:
      # Optimizer step state.step // grad_accum is still in the frozen phase: no gradient reaches
      # the frozen parameters (their optimizer moments stay zero) and they are kept exactly.
      steps, mask_fn = self.freeze
      mask = mask_fn(grads)  # Python bools: which leaves are frozen
      frozen = state.step // self.grad_accum < steps
      grads = jax.tree.map(lambda g, m: jnp.where(frozen, jnp.zeros_like(g), g) if m else g, grads, mask)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    scale = state.plateau.scale
    updates = jax.tree.map(lambda u: u * scale.astype(u.dtype), updates)
    params = optax.apply_updates(state.params, updates)
    if frozen is not None:
      params = jax.tree.map(lambda new, old, m: jnp.where(frozen, old, new) if m else new, params,
                            state.params, mask)
    ema = state.ema
    if ema is not None:
      done = (state.step + 1) % self.grad_accum == 0  # an optimizer step ended: params moved
      t = ((state.step + 1) // self.grad_accum).astype(jnp.float32)
      d = jnp.where(done, jnp.minimum(self.ema_decay, (1.0 + t) / (10.0 + t)), 1.0)
      # a + (1 − d)(p − a): a parameter that did not move (a frozen body) keeps its average exactly
      ema = jax.tree.map(lambda a, p: (a + (1.0 - d) * (p - a)).astype(a.dtype), ema, params)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              carry=jax.lax.stop_gradient(new_carry) if self.carry_state else None, ema=ema)
    # Whether the updated parameters are all finite (their global norm is): checked before a save.
    metrics = {"nll_sum": nll_sum, "count": count, "grad_norm": optax.global_norm(grads),
               "params_finite": jnp.isfinite(optax.global_norm(params)), **extra}
    return new_state, metrics

  def _eval_step(self, params, carry, batch: dict[str, Array]):
    if carry is not None:
      carry = reset_carry(carry, self.initial_carry(batch["inputs"].shape[0]), batch["reset"])
    new_carry, metrics = self._eval_metrics(params, carry, batch)
    return (new_carry if carry is not None else None), metrics

  def _update_plateau(self, state: TrainState, val_loss: Array) -> TrainState:
    _, plateau = self.plateau.update({}, state.plateau, value=val_loss)
    return state.replace(plateau=plateau)
