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
  cfg = OptimConfig(name="adamw", lr=1e-2, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1, decay_exclude=["bias", "norm"])
  ours = one_update(cfg, steps=3)
  mask = optim.decay_mask(["bias", "norm"])
  ref_tx = optax.adamw(1e-2, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1, mask=mask)
  state, params = ref_tx.init(PARAMS), PARAMS
  for _ in range(3):
    updates, state = ref_tx.update(GRADS, state, params)
    params = optax.apply_updates(params, updates)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ours, params)


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


def test_clipping_bounds_the_global_norm():
  big = jax.tree.map(lambda p: 100.0 * jnp.ones_like(p), PARAMS)
  tx = optim.make_optimizer(OptimConfig(name="sgd", lr=1.0, clip_norm=1.0), 10)
  updates, _ = tx.update(big, tx.init(PARAMS), PARAMS)
  assert float(optax.global_norm(updates)) == pytest.approx(1.0, rel=1e-5)


def test_warmup_cosine_schedule():
  s = optim.schedule(OptimConfig(lr=1e-3, schedule="warmup_cosine", warmup_steps=100, min_lr=1e-4), 2000)
  assert float(s(0)) == 0.0
  assert float(s(50)) == pytest.approx(5e-4)
  assert float(s(100)) == pytest.approx(1e-3)
  assert float(s(1050)) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4), rel=1e-3)
  assert float(s(2000)) == pytest.approx(1e-4)


def test_plateau_scales_by_factor_after_patience():
  plateau = optim.plateau(OptimConfig(plateau_factor=0.25, plateau_patience=1))
  state = plateau.init(PARAMS)
  for value, expected in ((5.0, 1.0), (4.0, 1.0), (4.5, 0.25), (3.0, 0.25), (3.0, 0.0625)):
    _, state = plateau.update({}, state, value=jnp.float32(value))
    assert float(state.scale) == pytest.approx(expected)


def test_grad_accumulation_equals_one_big_batch():
  """k micro-batches with optax.MultiSteps = one step on their mean gradient."""
  cfg1 = OptimConfig(name="adam", lr=1e-2)
  cfg2 = OptimConfig(name="adam", lr=1e-2, grad_accum=2)
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
