"""Optimizers and schedules: the Optax chains do the math the config names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nlm_jax.config import OptimConfig
from nlm_jax.training import optim

PARAMS = {"dense": {"kernel": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "bias": jnp.array([1.0, -1.0])},
          "ln_f": {"scale": jnp.array([2.0, 2.0])},
          "embed": {"embedding": jnp.array([[1.0, 1.0], [-1.0, 2.0]])}}
GRADS = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), PARAMS)


def one_update(cfg: OptimConfig, steps=1):
  tx = optim.make_optimizer(cfg, total_steps=100)
  state = tx.init(PARAMS)
  params = PARAMS
  for _ in range(steps):
    updates, state = tx.update(GRADS, state, params)
    params = optax.apply_updates(params, updates)
  return params


def test_sgd_is_theta_minus_lr_grad():
  new = one_update(OptimConfig(name="sgd", lr=0.5))
  jax.tree.map(lambda n, p, g: np.testing.assert_allclose(n, p - 0.5 * g, rtol=1e-6), new, PARAMS, GRADS)


def test_decay_mask_excludes_bias_norm_embedding():
  mask = optim.decay_mask(["bias", "norm", "embedding"])(PARAMS)
  assert mask == {"dense": {"kernel": True, "bias": False}, "ln_f": {"scale": False}, "embed": {"embedding": False}}
  mask = optim.decay_mask(["bias"])(PARAMS)
  assert mask["ln_f"]["scale"] and mask["embed"]["embedding"] and not mask["dense"]["bias"]


def test_l2_decay_is_gradient_of_penalty_in_the_loss():
  lr, wd = 0.5, 0.1
  new = one_update(OptimConfig(name="sgd", lr=lr, weight_decay=wd, weight_decay_mode="l2", decay_exclude=["bias"]))
  # θ − η(g + λθ) for decayed params, θ − ηg for biases.
  np.testing.assert_allclose(new["dense"]["kernel"], PARAMS["dense"]["kernel"] - lr * (0.1 + wd * PARAMS["dense"]["kernel"]), rtol=1e-6)
  np.testing.assert_allclose(new["dense"]["bias"], PARAMS["dense"]["bias"] - lr * 0.1, rtol=1e-6)


def test_adamw_decoupled_decay_matches_optax_adamw():
  # Gradients that change from step to step (a constant one makes m̂ = g and v̂ = g², whatever β₁, β₂).
  cfg = OptimConfig(name="adamw", lr=1e-2, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1, decay_exclude=["bias", "norm"])
  tx = optim.make_optimizer(cfg, total_steps=100)
  mask = optim.decay_mask(["bias", "norm"])
  ref_tx = optax.adamw(1e-2, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1, mask=mask)
  rng = np.random.default_rng(0)
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), PARAMS) for _ in range(4)]
  ours, ref = PARAMS, PARAMS
  state, ref_state = tx.init(PARAMS), ref_tx.init(PARAMS)
  for g in grads:
    updates, state = tx.update(g, state, ours)
    ours = optax.apply_updates(ours, updates)
    ref_updates, ref_state = ref_tx.update(g, ref_state, ref)
    ref = optax.apply_updates(ref, ref_updates)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ours, ref)


def test_adam_l2_differs_from_adamw():
  l2 = one_update(OptimConfig(name="adam", lr=1e-2, weight_decay=0.5, weight_decay_mode="l2"), steps=3)
  dec = one_update(OptimConfig(name="adamw", lr=1e-2, weight_decay=0.5), steps=3)
  assert not np.allclose(l2["dense"]["kernel"], dec["dense"]["kernel"])


def test_nesterov_momentum():
  cfg = OptimConfig(name="nesterov", lr=0.1, momentum=0.9)
  new = one_update(cfg, steps=2)
  # optax.trace(nesterov): m₁ = g, step1 = g + 0.9 m₁; m₂ = g + 0.9 m₁, step2 = g + 0.9 m₂.
  g = 0.1
  m1 = g
  s1 = g + 0.9 * m1
  m2 = g + 0.9 * m1
  s2 = g + 0.9 * m2
  np.testing.assert_allclose(new["dense"]["bias"], PARAMS["dense"]["bias"] - 0.1 * (s1 + s2), rtol=1e-6)


def test_momentum_is_heavy_ball_not_nesterov():
  """name='momentum': m_t = g_t + β m_{t−1}, θ ← θ − η m_t (optax.trace without Nesterov's look-ahead)."""
  lr, beta = 0.1, 0.9
  tx = optim.make_optimizer(OptimConfig(name="momentum", lr=lr, momentum=beta), total_steps=100)
  g1 = GRADS
  g2 = jax.tree.map(lambda p: -0.3 * jnp.arange(p.size, dtype=p.dtype).reshape(p.shape) + 0.2, PARAMS)
  state = tx.init(PARAMS)
  u1, state = tx.update(g1, state, PARAMS)
  p1 = optax.apply_updates(PARAMS, u1)
  u2, state = tx.update(g2, state, p1)
  p2 = optax.apply_updates(p1, u2)
  for path in (("dense", "kernel"), ("dense", "bias"), ("embed", "embedding")):
    theta, a, b = (np.asarray(t[path[0]][path[1]]) for t in (PARAMS, g1, g2))
    np.testing.assert_allclose(p1[path[0]][path[1]], theta - lr * a, rtol=1e-6)
    np.testing.assert_allclose(p2[path[0]][path[1]], theta - lr * a - lr * (b + beta * a), rtol=1e-6, atol=1e-7)


def test_clipping_bounds_the_global_norm():
  big = jax.tree.map(lambda p: 100.0 * jnp.ones_like(p), PARAMS)
  tx = optim.make_optimizer(OptimConfig(name="sgd", lr=1.0, clip_norm=1.0), 10)
  updates, _ = tx.update(big, tx.init(PARAMS), PARAMS)
  assert float(optax.global_norm(updates)) == pytest.approx(1.0, rel=1e-5)


def test_clipping_sees_the_data_gradient_only_then_l2_decay_is_added():
  """l2 mode: g ← clip(g) + λθ (as PyTorch's weight_decay), so the decay term is never clipped."""
  lr, wd = 0.5, 0.5
  cfg = OptimConfig(name="sgd", lr=lr, clip_norm=1.0, weight_decay=wd, weight_decay_mode="l2", decay_exclude=[])
  tx = optim.make_optimizer(cfg, 10)
  big = jax.tree.map(lambda p: 100.0 * jnp.ones_like(p), PARAMS)
  updates, _ = tx.update(big, tx.init(PARAMS), PARAMS)
  n_params = sum(p.size for p in jax.tree.leaves(PARAMS))
  g_unit = 1.0 / np.sqrt(n_params)  # every entry of g / ‖g‖ (all entries of g equal)
  jax.tree.map(lambda u, p: np.testing.assert_allclose(u, -lr * (g_unit + wd * np.asarray(p)), rtol=1e-5),
               updates, PARAMS)


def test_warmup_cosine_schedule():
  s = optim.schedule(OptimConfig(lr=1e-3, schedule="warmup_cosine", warmup_steps=100, min_lr=1e-4), 2000)
  assert float(s(0)) == 0.0
  assert float(s(50)) == pytest.approx(5e-4)
  assert float(s(100)) == pytest.approx(1e-3)
  assert float(s(1050)) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4), rel=1e-3)
  assert float(s(2000)) == pytest.approx(1e-4)


def numpy_warmup_cosine(t, lr, min_lr, warmup, decay_steps):
  """η_t = lr·t/w for t < w, then min_lr + (lr − min_lr)(1 + cos(π (t − w)/(D − w)))/2, min_lr past D."""
  t = np.asarray(t, np.float64)
  progress = np.clip(t - warmup, 0, decay_steps - warmup) / (decay_steps - warmup)
  cosine = min_lr + (lr - min_lr) * 0.5 * (1 + np.cos(np.pi * progress))
  return np.where(t < warmup, lr * t / max(warmup, 1), cosine)


@pytest.mark.parametrize("decay_steps,total", [(None, 150), (110, 400)])
def test_warmup_cosine_schedule_at_every_step(decay_steps, total):
  """Each η_t from 0 to past the end against the formula: the cosine is D − w steps long (D =
  decay_steps, or train.steps when it is None) and reaches min_lr exactly at D."""
  lr, min_lr, w = 1e-3, 1e-4, 10
  cfg = OptimConfig(lr=lr, schedule="warmup_cosine", warmup_steps=w, min_lr=min_lr, decay_steps=decay_steps)
  s = optim.schedule(cfg, total)
  t = np.arange(total + 20)
  got = np.array([float(s(int(i))) for i in t])
  np.testing.assert_allclose(got, numpy_warmup_cosine(t, lr, min_lr, w, decay_steps or total), rtol=1e-6)


def test_decay_steps_sets_the_cosine_length_not_train_steps():
  lr, min_lr = 1e-3, 1e-4
  s = optim.schedule(OptimConfig(lr=lr, schedule="warmup_cosine", warmup_steps=100, min_lr=min_lr, decay_steps=500), 2000)
  assert float(s(500)) == pytest.approx(min_lr, rel=1e-6)
  assert float(s(1500)) == pytest.approx(min_lr, rel=1e-6)
  assert float(s(300)) == pytest.approx(min_lr + (lr - min_lr) * 0.5 * (1 + np.cos(np.pi * 200 / 400)), rel=1e-6)


@pytest.mark.parametrize("kind", ["constant", "plateau"])
def test_warmup_of_constant_and_plateau_schedules(kind):
  """warmup_steps w with a constant (or plateau) schedule: η_t = lr·t/w up to w, then lr."""
  s = optim.schedule(OptimConfig(lr=2e-3, schedule=kind, warmup_steps=100), 1000)
  assert float(s(0)) == 0.0
  assert float(s(25)) == pytest.approx(5e-4, rel=1e-6)
  assert float(s(50)) == pytest.approx(1e-3, rel=1e-6)
  assert float(s(100)) == pytest.approx(2e-3, rel=1e-6)
  assert float(s(900)) == pytest.approx(2e-3, rel=1e-6)
  assert float(optim.schedule(OptimConfig(lr=2e-3, schedule=kind), 1000)(0)) == pytest.approx(2e-3)


def test_plateau_scales_by_factor_after_patience():
  plateau = optim.plateau(OptimConfig(plateau_factor=0.25, plateau_patience=1))
  state = plateau.init(PARAMS)
  for value, expected in ((5.0, 1.0), (4.0, 1.0), (4.5, 0.25), (3.0, 0.25), (3.0, 0.0625)):
    _, state = plateau.update({}, state, value=jnp.float32(value))
    assert float(state.scale) == pytest.approx(expected)


def test_plateau_counts_any_improvement():
  """Validation losses that fall by only 0.1% per evaluation are improvements: the scale stays 1."""
  plateau = optim.plateau(OptimConfig(plateau_factor=0.25, plateau_patience=1))
  state = plateau.init(PARAMS)
  value = 4.0
  for _ in range(8):
    _, state = plateau.update({}, state, value=jnp.float32(value))
    assert float(state.scale) == 1.0
    value *= 0.999


def test_grad_accumulation_equals_one_big_batch():
  """k micro-batches with optax.MultiSteps = one step on their mean gradient (SGD: the update is
  −η × that gradient, so a sum instead of the mean would show; Adam's normalization would hide it)."""
  cfg1 = OptimConfig(name="sgd", lr=0.5)
  cfg2 = OptimConfig(name="sgd", lr=0.5, grad_accum=2)
  g_a = jax.tree.map(lambda p: 0.3 * jnp.ones_like(p), PARAMS)
  g_b = jax.tree.map(lambda p: -0.1 * jnp.arange(p.size, dtype=p.dtype).reshape(p.shape), PARAMS)
  tx1, tx2 = optim.make_optimizer(cfg1, 10), optim.make_optimizer(cfg2, 10)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g_a, g_b)
  u1, _ = tx1.update(mean, tx1.init(PARAMS), PARAMS)
  s2 = tx2.init(PARAMS)
  u_first, s2 = tx2.update(g_a, s2, PARAMS)
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(u_first))  # no step mid-accumulation
  u2, _ = tx2.update(g_b, s2, PARAMS)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u1, u2)
  jax.tree.map(lambda u, m: np.testing.assert_allclose(u, -0.5 * m, rtol=1e-6), u2, mean)


@pytest.mark.parametrize("name", ["adamw", "momentum"])
def test_a_frozen_body_s_optimizer_starts_at_its_unfreezing(name):
  """With `freeze` = (k, mask), the masked parameters' updates after k frozen steps (zero
  gradients) are those of a fresh optimizer fed the same gradients (Adam's bias correction counts
  from the unfreezing), and the other parameters' updates are those without freezing."""
  cfg = OptimConfig(name=name, lr=0.1, weight_decay=0.0)
  k = 50
  params = {"body": jnp.zeros(3), "head": jnp.zeros(2)}
  held = optim.make_optimizer(cfg, 1000, freeze=(k, lambda p: {"body": True, "head": False}))
  plain = optim.make_optimizer(cfg, 1000)
  fresh = optim.make_optimizer(cfg, 1000)
  rng = np.random.default_rng(0)
  grads = [{"body": jnp.asarray(rng.normal(size=3), jnp.float32), "head": jnp.asarray(rng.normal(size=2), jnp.float32)}
           for _ in range(k + 20)]
  s_held, s_plain, s_fresh = held.init(params), plain.init(params), fresh.init(params)
  for t, g in enumerate(grads):
    body_g = g["body"] if t >= k else jnp.zeros(3)  # what the train step gives a frozen body
    u_held, s_held = held.update({"body": body_g, "head": g["head"]}, s_held, params)
    u_plain, s_plain = plain.update({"body": body_g, "head": g["head"]}, s_plain, params)
    np.testing.assert_allclose(u_held["head"], u_plain["head"], rtol=1e-6)  # (its own Adam: to the ulp)
    if t >= k:
      u_fresh, s_fresh = fresh.update({"body": g["body"], "head": g["head"]}, s_fresh, params)
      np.testing.assert_allclose(u_held["body"], u_fresh["body"], rtol=1e-6)
