"""Run by test_parallel.py in a process with 8 simulated CPU devices (XLA_FLAGS is set before
JAX starts): trains each architecture for N steps on several meshes, from the same initial state
and batches, and writes per-step losses, final params and parameter shardings to an .npz file."""

from __future__ import annotations

import json
import re
import sys

import jax
import numpy as np
import optax

from nlm_jax import models, parallel
from nlm_jax.config import OptimConfig
from nlm_jax.training import optim
from nlm_jax.training.steps import LMTask

V, B, T = 40, 8, 16  # a vocabulary that no mesh axis divides: it must fall back to replication
CONFIGS = {
    "transformer": models.TransformerConfig(vocab_size=V, d_model=32, n_heads=4, n_layers=2, d_ff=64, context=T),
    "lstm": models.LSTMConfig(vocab_size=V, d_embed=32, d_hidden=32, n_layers=2),
    "rnn": models.RNNConfig(vocab_size=V, d_embed=32, d_hidden=32, n_layers=2),
    "fnn": models.FNNConfig(vocab_size=V, context=3, d_embed=16, d_hidden=32),
}
MESHES = {"single": (1, 1, 1), "data8": (8, 1, 1), "fsdp8": (1, 8, 1), "data2_tensor4": (2, 1, 4),
          "data2_fsdp2_tensor2": (2, 2, 2)}


def batches(n_steps: int, seed: int = 0):
  # A learnable stream: each row counts up by 3 (mod V) from a random start, with 10% noise.
  rng = np.random.default_rng(seed)
  n = n_steps * T + 1
  stream = (rng.integers(0, V, size=(B, 1)) + 3 * np.arange(n)[None, :]) % V
  noise = rng.random((B, n)) < 0.1
  stream = np.where(noise, rng.integers(0, V, size=(B, n)), stream).astype(np.int32)
  for k in range(n_steps):
    x = stream[:, k * T:(k + 1) * T + 1]
    yield {"inputs": x[:, :-1], "targets": x[:, 1:], "mask": np.ones((B, T), np.float32),
           "reset": np.full((B,), k == 0)}


def run(arch: str, mesh_name: str, n_steps: int):
  data, fsdp, tensor = MESHES[mesh_name]
  devices = jax.devices()[: data * fsdp * tensor]
  mesh = parallel.make_mesh(data, fsdp, tensor, devices=devices)
  cfg = OptimConfig(name="adamw", lr=1e-2, weight_decay=0.01, clip_norm=1.0)

  def make_task(**kw):
    return LMTask(models.build(CONFIGS[arch]), optim.make_optimizer(cfg, n_steps), optim.plateau(cfg), mesh, B,
                  carry_state=arch != "transformer", example_len=T, **kw)  # gathers fsdp for the RNN/LSTM by default

  def activation_constraints(task):
    """The activations' layouts as the step's StableHLO states them (layers.constrain)."""
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=task.batch_sharding) for k, v in next(batches(1)).items()}
    lowered = task.train_step.lower(task.abstract_state, batch).as_text()
    return sorted(set(re.findall(r"sdy\.sharding_constraint %\S+ <@mesh, (\[.*?\])>", lowered)))

  task = make_task()
  state = task.init(jax.random.key_data(jax.random.key(0)))
  activations = {"on": activation_constraints(task), "off": activation_constraints(make_task(activation_sharding=False))}
  losses = []
  for b in batches(n_steps):
    state, m = task.train_step(state, parallel.global_batch(b, task.batch_sharding, B))
    losses.append(m["nll_sum"] / m["count"])
  shardings = {jax.tree_util.keystr(p): str(x.sharding.spec)
               for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  mu = optax.tree_utils.tree_get(state.opt_state, "mu")  # Adam's first moment
  mu_shardings = {jax.tree_util.keystr(p): str(x.sharding.spec) for p, x in jax.tree_util.tree_flatten_with_path(mu)[0]}
  params = {jax.tree_util.keystr(p): np.asarray(jax.device_get(x))
            for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  return np.asarray(jax.device_get(losses)), params, shardings, mu_shardings, activations


def main(out_path: str, n_steps: int, archs: list[str]):
  assert jax.device_count() == 8, jax.devices()
  arrays, layout = {}, {}
  for arch in archs:
    for mesh_name in MESHES:
      losses, params, shardings, mu_shardings, activations = run(arch, mesh_name, n_steps)
      arrays[f"{arch}/{mesh_name}/losses"] = losses
      for name, value in params.items():
        arrays[f"{arch}/{mesh_name}/params{name}"] = value
      layout[f"{arch}/{mesh_name}"] = {"params": shardings, "mu": mu_shardings, "activations": activations}
  np.savez(out_path, **arrays)
  with open(out_path + ".json", "w") as f:
    json.dump(layout, f)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","))
