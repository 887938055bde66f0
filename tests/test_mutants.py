"""Tests aimed at mutations the rest of the suite once let through (issue 12): each states a
property of the math (the FFN's nonlinearity, where dropout acts, the residual projections' init
scale, which parameters weight decay touches) and fails for the mutated code."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nlm_jax import models
from nlm_jax.config import OptimConfig
from nlm_jax.training import optim

V = 13


def transformer(**kw) -> models.TransformerConfig:
  base = dict(vocab_size=V, d_model=16, n_heads=2, n_layers=2, d_ff=32, context=12)
  return models.TransformerConfig(**{**base, **kw})


def init(cfg, T: int = 8):
  model = models.build(cfg)
  tokens = jax.random.randint(jax.random.key(1), (2, T), 0, V)
  return model, nn.unbox(model.init(jax.random.key(0), tokens)["params"]), tokens


def captured(model, params, tokens, **kw):
  """Every submodule's output (Flax `capture_intermediates`)."""
  _, state = model.apply({"params": params}, tokens, capture_intermediates=True, mutable=["intermediates"], **kw)
  return state["intermediates"]


def ffn_reference(p, x_NxD):
  """GELU(x W₁ + b₁) W₂ + b₂ in NumPy (GELU: x Φ(x), exactly; the tanh form is within 1e-3)."""
  from scipy.special import erf

  h = x_NxD @ np.asarray(p["w1"]["kernel"]) + np.asarray(p["w1"]["bias"])
  gelu = 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))
  return gelu @ np.asarray(p["w2"]["kernel"]) + np.asarray(p["w2"]["bias"])


def test_transformer_ffn_nonlinearity_is_gelu():
  cfg = transformer(n_layers=1)
  model, params, tokens = init(cfg)
  # Weights of unit scale, so that pre-activations reach both sides of 0 well past GELU's curve.
  ffn = params["block_0"]["ffn"]
  k1, k2 = jax.random.split(jax.random.key(7))
  ffn["w1"]["kernel"] = jax.random.normal(k1, ffn["w1"]["kernel"].shape) / math.sqrt(cfg.d_model)
  ffn["w2"]["kernel"] = jax.random.normal(k2, ffn["w2"]["kernel"].shape) / math.sqrt(cfg.d_ff)
  inter = captured(model, params, tokens)
  x = np.asarray(inter["block_0"]["ln2"]["__call__"][0])
  y = np.asarray(inter["block_0"]["ffn"]["__call__"][0])
  ref = ffn_reference(jax.tree.map(np.asarray, ffn), x)
  assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-2  # ReLU would be ~0.3 off


def test_transformer_ffn_output_is_dropped_out_in_training():
  """y = Dropout(FFN(x)): each output of W₂ is 0 or FFN(x)/(1 − p), for the FFN's own input."""
  rate = 0.5
  cfg = transformer(n_layers=1, dropout=rate, attn_dropout=0.0)
  model, params, tokens = init(cfg)
  inter = captured(model, params, tokens, deterministic=False, rngs={"dropout": jax.random.key(3)})
  x = np.asarray(inter["block_0"]["ln2"]["__call__"][0])
  y = np.asarray(inter["block_0"]["ffn"]["__call__"][0])
  ref = ffn_reference(jax.tree.map(np.asarray, params["block_0"]["ffn"]), x)
  kept = y != 0
  assert 0.3 < 1 - kept.mean() < 0.7, "about a fraction p of the FFN's outputs must be zeroed"
  np.testing.assert_allclose(y[kept], ref[kept] / (1 - rate), rtol=1e-4, atol=1e-6)


def test_residual_output_projections_start_scaled_by_one_over_sqrt_2L():
  """GPT-2: W_O and W₂ (the projections added into the residual stream) start with std
  0.02/√(2L), every other matrix with 0.02."""
  L = 8
  cfg = transformer(d_model=64, n_heads=4, n_layers=L, d_ff=256, context=8)
  _, params, _ = init(cfg)
  for l in range(L):
    block = params[f"block_{l}"]
    for name, kernel in (("W_O", block["attn"]["out"]["kernel"]), ("W_2", block["ffn"]["w2"]["kernel"])):
      assert float(jnp.std(kernel)) == pytest.approx(0.02 / math.sqrt(2 * L), rel=0.1), (l, name)
    for kernel in (block["attn"]["query"]["kernel"], block["ffn"]["w1"]["kernel"]):
      assert float(jnp.std(kernel)) == pytest.approx(0.02, rel=0.1)


ARCH_CONFIGS = {
    "transformer": transformer(pos_encoding="learned"),
    "lstm": models.LSTMConfig(vocab_size=V, d_embed=8, d_hidden=12, n_layers=2),
    "rnn": models.RNNConfig(vocab_size=V, d_embed=8, d_hidden=12, n_layers=2),
    "fnn": models.FNNConfig(vocab_size=V, context=4, d_embed=8, d_hidden=16),
}
# The weight matrices of each model's equations (what multiplies an input); every other parameter is
# a bias (b, b_out, the LSTM's gate biases b), a LayerNorm gain or shift, or an embedding (E, P, C).
MATRICES = ("kernel", "W", "U")


@pytest.mark.parametrize("arch", ARCH_CONFIGS)
def test_weight_decay_touches_only_weight_matrices_when_biases_norms_embeddings_are_excluded(arch):
  _, params, _ = init(ARCH_CONFIGS[arch])
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  names = {jax.tree_util.keystr(path): str(path[-1].key) for path, _ in flat}
  assert any(n in ("b", "bias") for n in names.values())
  if arch == "transformer":
    assert "['pos_embed']" in names  # learned positions: an embedding, not decayed
  expected = {p: name in MATRICES for p, name in names.items()}
  mask = optim.decay_mask(["bias", "norm", "embedding"])(params)
  got = {jax.tree_util.keystr(path): bool(m) for path, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert got == expected
  # And the optimizer applies it: with zero gradients, SGD + decay moves exactly those parameters.
  tx = optim.make_optimizer(OptimConfig(name="sgd", lr=1.0, weight_decay=0.5, decay_exclude=["bias", "norm", "embedding"]),
                            total_steps=1)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  moved = {jax.tree_util.keystr(path): bool(jnp.any(u != 0)) for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]}
  assert moved == {p: e and bool(jnp.any(x != 0)) for (p, e), x in zip(expected.items(), jax.tree.leaves(params))}


def _layer_norm_reference(x_NxD):
  """LayerNorm with its initial scale 1 and bias 0 (ε = 1e-5)."""
  x_NxD = np.asarray(x_NxD, np.float64)
  mean = x_NxD.mean(-1, keepdims=True)
  return (x_NxD - mean) / np.sqrt(((x_NxD - mean) ** 2).mean(-1, keepdims=True) + 1e-5)


def _dropout_outputs(inter) -> list:
  return [np.asarray(v["__call__"][0]) for k, v in inter.items() if k.startswith("Dropout")]


def test_transformer_embeddings_are_dropped_out_in_training():
  """The first block reads Dropout(h⁰): each element 0 or h⁰/(1 − p), for h⁰ = E[w] + P."""
  rate = 0.5
  cfg = transformer(n_layers=1, dropout=rate, attn_dropout=0.0)
  model, params, tokens = init(cfg)
  inter = captured(model, params, tokens, deterministic=False, rngs={"dropout": jax.random.key(3)})
  h0 = np.asarray(inter["h0"][0])
  dropped = _dropout_outputs(inter)
  assert len(dropped) == 1, "the embeddings' dropout"
  x = dropped[0]
  kept = x != 0
  assert 0.3 < 1 - kept.mean() < 0.7, "about a fraction p of h⁰ must be zeroed"
  np.testing.assert_allclose(x[kept], h0[kept] / (1 - rate), rtol=1e-5, atol=1e-7)
  ln1 = np.asarray(inter["block_0"]["ln1"]["__call__"][0])  # what the block normalizes is x
  np.testing.assert_allclose(ln1, _layer_norm_reference(x.reshape(-1, cfg.d_model)), rtol=1e-4, atol=1e-4)


def test_transformer_attention_output_is_dropped_out_before_the_residual_add():
  """a = h + Dropout(MHA(LN(h))): a − h (the block's output less its FFN's, less its input) is,
  elementwise, 0 or y/(1 − p) for y the attention's output."""
  rate = 0.5
  cfg = transformer(n_layers=1, dropout=rate, attn_dropout=0.0)
  model, params, tokens = init(cfg)
  inter = captured(model, params, tokens, deterministic=False, rngs={"dropout": jax.random.key(3)})
  (x,) = _dropout_outputs(inter)  # the block's input h: the embeddings after their dropout
  h = np.asarray(x, np.float64).reshape(-1, cfg.d_model)
  block = inter["block_0"]
  y = np.asarray(block["attn"]["__call__"][0][0], np.float64)
  branch = (np.asarray(block["__call__"][0][0], np.float64) - np.asarray(block["ffn"]["__call__"][0], np.float64)
            - h)
  big = np.abs(y) > 1e-4 * np.abs(y).max()
  ratio = branch[big] / (y[big] / (1 - rate))  # 0 where dropped, 1 where kept
  near0, near1 = np.abs(ratio) < 1e-2, np.abs(ratio - 1) < 1e-2
  assert (near0 | near1).all(), "each element of the attention branch is dropped or scaled by 1/(1 − p)"
  assert 0.3 < near0.mean() < 0.7


@pytest.mark.parametrize("scan", [False, True])
def test_transformer_layers_draw_their_own_dropout_masks(scan):
  """With embeddings, attention and FFN weights zeroed and the FFN's output bias 1, the residual
  stream after 2 layers is (m₀ + m₁)/(1 − p) for the layers' FFN dropout masks m_l: scanned layers
  too draw different masks (the value 1/(1 − p) occurs, not only 0 and 2/(1 − p))."""
  rate = 0.5
  cfg = transformer(n_layers=2, dropout=rate, attn_dropout=0.0, scan_layers=scan)
  model, params, tokens = init(cfg)
  zero = lambda x: jnp.zeros_like(x)
  params = jax.tree.map(zero, params)
  blocks = [params["blocks"]] if scan else [params["block_0"], params["block_1"]]
  for b in blocks:
    b["ffn"]["w2"]["bias"] = jnp.ones_like(b["ffn"]["w2"]["bias"])
    for ln in ("ln1", "ln2"):
      b[ln]["scale"] = jnp.ones_like(b[ln]["scale"])
  params["ln_f"]["scale"] = jnp.ones_like(params["ln_f"]["scale"])
  out = model.apply({"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.key(5)})
  hidden = np.asarray(out.hidden).reshape(-1, cfg.d_model)
  distinct = [len(np.unique(np.round(row, 4))) for row in hidden]
  assert max(distinct) == 3 and np.mean([d == 3 for d in distinct]) > 0.5, distinct
