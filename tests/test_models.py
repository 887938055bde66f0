"""The four language models against the equations their files open with.

Every test checks a value the math fixes (a NumPy recurrence, a finite difference, a symmetry, a
parameter count), and each is set up so that a plausible wrong implementation fails it: parameters
are random rather than initial (zero biases, unit LayerNorms and the FNN's zero direct weights
would hide misplaced terms), and where a test asserts "unchanged" it also asserts that the thing
it varies does change something.
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from nlm_jax import runtime
from nlm_jax.models import (FNNConfig, LSTMConfig, RNNConfig, TransformerConfig, build, config_from_dict,
                            config_to_dict)
from nlm_jax.models.lstm import LSTMLayer
from nlm_jax.models.rnn import ElmanLayer
from nlm_jax.models import layers
from nlm_jax.models.transformer import (MultiHeadAttention, apply_rotary, attention_impl, dot_product_attention,
                                        sinusoidal_positions)
from nlm_jax.objectives import next_token_nll

TRANSFORMER_VARIANTS = {
    "sinusoidal": dict(pos_encoding="sinusoidal"),
    "learned": dict(pos_encoding="learned"),
    "rotary": dict(pos_encoding="rotary"),
    "none": dict(pos_encoding="none"),
    "scan": dict(pos_encoding="rotary", scan_layers=True),
}
ALL_CASES = ["fnn", "rnn", "lstm"] + [f"transformer-{v}" for v in TRANSFORMER_VARIANTS]


# ----------------------------------------------------------------------------- helpers
# Every model evaluation goes through `jit`: eager Flax code compiles each primitive on first use,
# which costs more here than compiling the whole forward pass once. The tests compile many small
# programs and run each a few times, so LLVM's -O0 (half the compile time) changes nothing but the
# rounding of the last bits.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def case_config(request, case: str, **overrides):
  """'lstm' → the lstm_config fixture; 'transformer-rotary' → transformer_config with rotary."""
  arch, _, variant = case.partition("-")
  cfg = request.getfixturevalue(f"{arch}_config")
  return dataclasses.replace(cfg, **TRANSFORMER_VARIANTS.get(variant, {}), **overrides)


def random_tokens(B: int, T: int, vocab: int, seed: int = 0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (B, T)), jnp.int32)


def random_params(init_fn, *args, seed: int = 0, scale: float = 0.3):
  """Variables shaped as `init_fn(key, *args)` makes them, drawn N(0, scale²) (LayerNorm scales
  1 + N(0, scale²)), so no parameter keeps a special value: zero biases, unit LayerNorms and the
  FNN's zero direct weights would hide misplaced terms. Uses the shapes only (`eval_shape`):
  compiling the initializers costs seconds on CPU."""
  shapes = nn.meta.unbox(jax.eval_shape(init_fn, jax.random.key(0), *args))
  rng = np.random.default_rng(seed)

  def draw(path, s):
    x = scale * rng.standard_normal(s.shape) + (1.0 if path[-1].key == "scale" else 0.0)
    return jnp.asarray(x, s.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def init_model(cfg, B: int = 2, T: int = 8, seed: int = 0, scale: float = 0.3):
  """The model, random variables for it and random tokens (B, T)."""
  model = build(cfg)
  variables = random_params(model.init, jnp.zeros((1, 2), jnp.int32), seed=seed, scale=scale)
  return model, variables, random_tokens(B, T, cfg.vocab_size, seed)


@functools.cache
def compiled_apply(cfg):
  """`build(cfg).apply`, jitted once per config so tests share its compiled executables."""
  return jit(build(cfg).apply, static_argnames=("deterministic", "mutable", "capture_intermediates"))


def mean_nll(model, variables, tokens, **kwargs):
  """Mean next-token NLL of tokens[:, 1:] given tokens[:, :-1]."""
  logits = model.apply(variables, tokens[:, :-1], **kwargs).logits
  nll_sum, count = next_token_nll(logits, tokens[:, 1:])
  return nll_sum / count


@functools.cache
def compiled_loss(cfg):
  model = build(cfg)
  return jit(lambda variables, tokens: mean_nll(model, variables, tokens))


def fast_random_bits():
  """Compiled dropout masks and initializers draw random bits; with JAX's default partitionable
  threefry, XLA's CPU compile time grows steeply with the rank of the array drawn (seconds for a
  (B, T, H) mask). These tests check what is done with the bits, not the bits, so they may use
  the classic threefry."""
  return jax.threefry_partitionable(False)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-5):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


# NumPy versions of the equations, in float64, kernels stored input-first (x W rather than W x).


def elman_numpy(x_BxTxM, h_BxH, W, U, b, activation="tanh"):
  """h_t = φ(W x_t + U h_{t−1} + b); returns (h_1..h_T, h_T)."""
  phi = np.tanh if activation == "tanh" else (lambda z: np.maximum(z, 0.0))
  x_BxTxM, h_BxH, W, U, b = (np.asarray(a, np.float64) for a in (x_BxTxM, h_BxH, W, U, b))
  hs = []
  for t in range(x_BxTxM.shape[1]):
    h_BxH = phi(x_BxTxM[:, t] @ W + h_BxH @ U + b)
    hs.append(h_BxH)
  return np.stack(hs, axis=1), h_BxH


def lstm_numpy(x_BxTxM, c_BxH, h_BxH, W, U, b):
  """The LSTM gate equations with gate order (i, f, g, o); returns (h_1..h_T, (c_T, h_T))."""
  sigmoid = lambda z: 1.0 / (1.0 + np.exp(-z))
  x_BxTxM, c_BxH, h_BxH, W, U, b = (np.asarray(a, np.float64) for a in (x_BxTxM, c_BxH, h_BxH, W, U, b))
  hs = []
  for t in range(x_BxTxM.shape[1]):
    x = x_BxTxM[:, t]
    i = sigmoid(x @ W[:, 0] + h_BxH @ U[:, 0] + b[0])
    f = sigmoid(x @ W[:, 1] + h_BxH @ U[:, 1] + b[1])
    g = np.tanh(x @ W[:, 2] + h_BxH @ U[:, 2] + b[2])
    o = sigmoid(x @ W[:, 3] + h_BxH @ U[:, 3] + b[3])
    c_BxH = f * c_BxH + i * g
    h_BxH = o * np.tanh(c_BxH)
    hs.append(h_BxH)
  return np.stack(hs, axis=1), (c_BxH, h_BxH)


def rotary_numpy(x_TxK, positions_T):
  """Rotates each pair (x_{2i}, x_{2i+1}) by t·θ_i, θ_i = 10000^{−2i/d_k}."""
  x_TxK = np.asarray(x_TxK, np.float64)
  out = np.empty_like(x_TxK)
  d_k = x_TxK.shape[-1]
  for t, pos in enumerate(positions_T):
    for i in range(d_k // 2):
      angle = pos * 10000.0 ** (-2 * i / d_k)
      a, b = x_TxK[t, 2 * i], x_TxK[t, 2 * i + 1]
      out[t, 2 * i] = a * math.cos(angle) - b * math.sin(angle)
      out[t, 2 * i + 1] = a * math.sin(angle) + b * math.cos(angle)
  return out


def all_eqns(jaxpr) -> list:
  """The equations of a jaxpr and of every jaxpr nested in their parameters (scan, remat, pjit)."""
  def subs(value):
    if hasattr(value, "eqns"):
      yield value
    elif hasattr(value, "jaxpr") and hasattr(value, "consts"):  # a ClosedJaxpr
      yield value.jaxpr
    elif isinstance(value, (tuple, list)):
      for v in value:
        yield from subs(v)

  out = []
  for e in jaxpr.eqns:
    out.append(e)
    for sub in subs(list(e.params.values())):
      out.extend(all_eqns(sub))
  return out


# ----------------------------------------------------------------------------- 1. causality


@pytest.mark.parametrize("case", ALL_CASES)
def test_changing_token_t_changes_logits_at_t_and_none_before(request, case):
  cfg = case_config(request, case)
  _, variables, tokens = init_model(cfg, T=8)
  apply = compiled_apply(cfg)
  logits = apply(variables, tokens).logits
  for t in range(tokens.shape[1]):
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % cfg.vocab_size)
    new = apply(variables, changed).logits
    np.testing.assert_allclose(new[:, :t], logits[:, :t], rtol=0, atol=1e-6, err_msg=f"t={t}")
    assert np.abs(new[:, t] - logits[:, t]).max() > 1e-3, f"logits at {t} ignore token {t}"


def test_fnn_sees_exactly_the_last_n_minus_1_tokens(fnn_config):
  """logits_t depends on w_{t−n+2}..w_t: changing w_s moves the logits at s..s+n−2 only."""
  n, T = fnn_config.context, 8
  _, variables, tokens = init_model(fnn_config, T=T)
  apply = compiled_apply(fnn_config)
  logits = apply(variables, tokens).logits
  for s in range(T):
    changed = tokens.at[:, s].set((tokens[:, s] + 1) % fnn_config.vocab_size)
    moved = np.abs(apply(variables, changed).logits - logits).max(axis=(0, 2)) > 1e-6
    np.testing.assert_array_equal(moved, (np.arange(T) >= s) & (np.arange(T) <= s + n - 2), err_msg=f"s={s}")


@pytest.mark.parametrize("direct", [True, False])
def test_fnn_equals_numpy_bengio_equations(fnn_config, direct):
  """y = b + W x + U tanh(d + H x), x = (C[w_{t−n+2}], ..., C[w_t]), bos_id before the start."""
  cfg = dataclasses.replace(fnn_config, direct=direct, bos_id=3)
  _, variables, tokens = init_model(cfg, T=8)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  assert ("W" in p) == direct
  n, C = cfg.context, p["C"]["embedding"]
  padded = np.concatenate([np.full((tokens.shape[0], n - 1), cfg.bos_id), np.asarray(tokens)], axis=1)
  y = np.zeros(tokens.shape + (cfg.vocab_size,))
  for b in range(tokens.shape[0]):
    for t in range(tokens.shape[1]):
      x = np.concatenate([C[padded[b, t + 1 + j]] for j in range(n - 1)])  # oldest first, ends at w_t
      a = np.tanh(p["H"]["bias"] + x @ p["H"]["kernel"])
      y[b, t] = p["U"]["bias"] + a @ p["U"]["kernel"] + (x @ p["W"]["kernel"] if direct else 0.0)
  out = compiled_apply(cfg)(variables, tokens)
  np.testing.assert_allclose(out.logits, y, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- 2. decoding with a carry


@pytest.mark.parametrize("variant", list(TRANSFORMER_VARIANTS))
def test_kv_cache_decoding_equals_full_forward(transformer_config, variant):
  """Token by token from an empty cache, and a prefill of k tokens then token by token, give the
  logits of the plain causal forward pass, up to the cache's last slot."""
  cfg = dataclasses.replace(transformer_config, **TRANSFORMER_VARIANTS[variant])
  T = cfg.context
  model, variables, tokens = init_model(cfg, T=T)
  apply = compiled_apply(cfg)
  full = apply(variables, tokens).logits
  for k in (1, 5):
    out = apply(variables, tokens[:, :k], model.initial_carry(2))
    outs, cache = [out.logits], out.carry
    assert int(cache.index) == k
    for t in range(k, T):
      out = apply(variables, tokens[:, t:t + 1], cache)
      outs.append(out.logits)
      cache = out.carry
    assert int(cache.index) == T
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5, err_msg=f"prefill {k}")


def test_kv_cache_decoding_in_float64_under_x64(transformer_config):
  """float64 models need jax_enable_x64, where Python's 0 is int64: the cache's update index
  mixed int64 and int32 and every cached path (sampling, beam search) failed."""
  with jax.enable_x64(True):
    cfg = dataclasses.replace(transformer_config, dtype="float64", param_dtype="float64")
    model, variables, tokens = init_model(cfg, T=6)
    full = model.apply(variables, tokens).logits
    first = model.apply(variables, tokens[:, :4], model.initial_carry(2))
    rest = model.apply(variables, tokens[:, 4:], first.carry)
    assert full.dtype == jnp.float64
    np.testing.assert_allclose(jnp.concatenate([first.logits, rest.logits], axis=1), full, rtol=1e-12, atol=1e-12)


def test_learned_positions_past_the_context_and_empty_calls_are_named_errors(transformer_config):
  """(They were a TypeError about slice sizes and a ZeroDivisionError.)"""
  cfg = dataclasses.replace(transformer_config, pos_encoding="learned")
  model, variables, _ = init_model(cfg, T=4)
  too_long = jnp.ones((1, cfg.context + 1), jnp.int32)
  with pytest.raises(ValueError, match=f"exceed model.context={cfg.context}"):
    model.apply(variables, too_long)
  with pytest.raises(ValueError, match="0 tokens"):
    model.apply(variables, jnp.ones((1, 0), jnp.int32))
  rotary = dataclasses.replace(transformer_config, pos_encoding="rotary")  # scores past its context
  model, variables, _ = init_model(rotary, T=4)
  assert model.apply(variables, too_long).logits.shape == (1, cfg.context + 1, cfg.vocab_size)


def test_kv_cache_overflow_is_an_error_or_nan(transformer_config):
  """The cache holds model.context positions; feeding past them (dynamic_update_slice clamps its
  start, so the newest keys would overwrite cached ones) raises when called eagerly, and gives
  NaN, not plausible wrong numbers, under jit."""
  cfg = dataclasses.replace(transformer_config, pos_encoding="rotary")
  model, variables, tokens = init_model(cfg, T=cfg.context)
  carry = model.apply(variables, tokens[:, :cfg.context - 2], model.initial_carry(2)).carry
  with pytest.raises(ValueError, match="KV cache overflow"):
    model.apply(variables, tokens[:, :4], carry)
  assert bool(jnp.isfinite(compiled_apply(cfg)(variables, tokens[:, :2], carry).logits).all())  # fills it
  assert bool(jnp.isnan(compiled_apply(cfg)(variables, tokens[:, :4], carry).logits).all())


def test_cudnn_attention_refuses_a_prefix_mask(transformer_config):
  """cuDNN's fused attention is causal only: asked for with a prefix-LM mask it raises rather than
  drop the mask (the fused call is not reached: this holds on a CPU too)."""
  cfg = dataclasses.replace(transformer_config, dtype="bfloat16")
  _, variables, tokens = init_model(cfg, T=6)  # initialized with XLA's attention (no cuDNN here)
  with pytest.raises(ValueError, match="prefix-LM mask"):
    build(dataclasses.replace(cfg, attention="cudnn")).apply(variables, tokens, prefix_B=jnp.asarray([3, 0]))


@pytest.mark.parametrize("arch", ["fnn", "rnn", "lstm"])
def test_stepwise_with_carry_equals_full_forward(request, arch):
  cfg = request.getfixturevalue(f"{arch}_config")
  model, variables, tokens = init_model(cfg, T=8)
  apply = compiled_apply(cfg)
  full = apply(variables, tokens)
  carry, steps = model.initial_carry(2), []
  for t in range(tokens.shape[1]):
    out = apply(variables, tokens[:, t:t + 1], carry)
    steps.append(out.logits)
    carry = out.carry
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full.logits, rtol=1e-5, atol=1e-5)
  assert_trees_close(carry, full.carry)


def other_carry(cfg, model, variables, B: int):
  """A state other than the initial one: random ids, random (c, h), or a cache holding 3 tokens."""
  rng = np.random.default_rng(7)
  if cfg.arch == "fnn":
    return jnp.asarray(rng.integers(0, cfg.vocab_size, (B, cfg.context - 1)), jnp.int32)
  if cfg.arch == "transformer":
    return compiled_apply(cfg)(variables, random_tokens(B, 3, cfg.vocab_size, seed=9), model.initial_carry(B)).carry
  return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), model.initial_carry(B))


def test_two_calls_passing_the_carry_equal_one_call(config):
  """What truncated BPTT relies on: splitting a sequence changes nothing, from any state."""
  model, variables, tokens = init_model(config, T=8)
  apply = compiled_apply(config)
  initial = model.initial_carry(2)
  np.testing.assert_allclose(apply(variables, tokens, initial).logits, apply(variables, tokens).logits,
                             rtol=1e-6, atol=1e-6)  # the explicit initial state is what carry=None means
  for carry0 in (initial, other_carry(config, model, variables, 2)):
    whole = apply(variables, tokens, carry0)
    first = apply(variables, tokens[:, :3], carry0)
    second = apply(variables, tokens[:, 3:], first.carry)
    np.testing.assert_allclose(jnp.concatenate([first.logits, second.logits], axis=1), whole.logits,
                               rtol=1e-5, atol=1e-5)
    assert_trees_close(second.carry, whole.carry)
  assert np.abs(whole.logits - apply(variables, tokens, initial).logits).max() > 1e-3  # the carry is used


def test_fnn_carry_is_the_last_n_minus_1_ids(fnn_config):
  n = fnn_config.context
  model, variables, tokens = init_model(fnn_config, T=8)
  apply = compiled_apply(fnn_config)
  initial = model.initial_carry(2)
  np.testing.assert_array_equal(initial, np.full((2, n - 1), fnn_config.bos_id))
  np.testing.assert_array_equal(apply(variables, tokens, initial).carry, tokens[:, -(n - 1):])
  window = tokens[:, 1:n]  # a call shorter than the window slides it by its length
  np.testing.assert_array_equal(apply(variables, tokens[:, :1], window).carry,
                                np.concatenate([window[:, 1:], tokens[:, :1]], axis=1))


# ----------------------------------------------------------------------------- 3. gradients


@pytest.mark.parametrize("case", ["fnn", "rnn", "lstm", "transformer-learned", "transformer-scan"])
def test_gradient_equals_central_differences_in_float64(request, case):
  """transformer-scan is rotary with nn.scan over layers; it also recomputes activations (remat)."""
  with jax.enable_x64(True):
    cfg = case_config(request, case, dtype="float64", param_dtype="float64",
                      **(dict(remat=True) if case == "transformer-scan" else {}))
    model, variables, tokens = init_model(cfg, B=2, T=7)
    params = variables["params"]
    flat, unravel = ravel_pytree(params)
    assert flat.dtype == jnp.float64

    def mean_nll_of(flat):
      return mean_nll(model, {"params": unravel(flat)}, tokens)

    loss = jit(mean_nll_of)
    grad = np.asarray(jit(jax.grad(mean_nll_of))(flat))
    eps = 1e-5

    def central(u):
      return float(loss(flat + eps * u) - loss(flat - eps * u)) / (2 * eps)

    rng = np.random.default_rng(0)
    for _ in range(3):  # directional derivatives along random unit directions, tilted towards the
      u = rng.standard_normal(flat.shape)  # gradient so that the derivative is not near 0
      u = u / np.linalg.norm(u) + grad / np.linalg.norm(grad)
      u /= np.linalg.norm(u)
      np.testing.assert_allclose(central(u), grad @ u, rtol=1e-6)

    offset = 0  # in every parameter array: its largest gradient entry and a random one
    for leaf in jax.tree.leaves(params):
      g = grad[offset:offset + leaf.size]
      for i in {int(np.argmax(np.abs(g))), int(rng.integers(leaf.size))}:
        e = np.zeros(flat.shape)
        e[offset + i] = 1.0
        fd = central(e)
        assert abs(fd - g[i]) <= 1e-6 * abs(g[i]) + 1e-9, (offset + i, fd, g[i])
      offset += leaf.size
    assert offset == flat.size


# ----------------------------------------------------------------------------- 4. recurrences


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_elman_layer_equals_numpy_recurrence(activation):
  cfg = RNNConfig(vocab_size=11, d_embed=5, d_hidden=7, n_layers=1, activation=activation)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((3, 6, 5)), jnp.float32)
  h0 = jnp.asarray(rng.standard_normal((3, 7)), jnp.float32)
  layer = ElmanLayer(cfg)
  variables = random_params(layer.init, x, h0, scale=0.5)
  hs, hT = jit(layer.apply)(variables, x, h0)
  p = variables["params"]
  hs_ref, hT_ref = elman_numpy(x, h0, p["W"], p["U"], p["b"], activation)
  np.testing.assert_allclose(hs, hs_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(hT, hT_ref, rtol=1e-5, atol=1e-5)
  if activation == "relu":  # both sides of the kink occur, so relu and tanh cannot agree by chance
    assert (hs_ref == 0).mean() > 0.1 and (hs_ref > 1.0).any()


def test_lstm_layer_equals_numpy_gate_equations():
  cfg = LSTMConfig(vocab_size=11, d_embed=5, d_hidden=7, n_layers=1)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((3, 6, 5)), jnp.float32)
  c0, h0 = (jnp.asarray(rng.standard_normal((3, 7)), jnp.float32) for _ in range(2))
  layer = LSTMLayer(cfg)
  variables = random_params(layer.init, x, (c0, h0), scale=0.5)
  hs, (cT, hT) = jit(layer.apply)(variables, x, (c0, h0))
  p = variables["params"]
  hs_ref, (cT_ref, hT_ref) = lstm_numpy(x, c0, h0, p["W"], p["U"], p["b"])
  np.testing.assert_allclose(hs, hs_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(cT, cT_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(hT, hT_ref, rtol=1e-5, atol=1e-5)


def test_lstm_forget_gate_bias_starts_at_forget_bias():
  cfg = LSTMConfig(vocab_size=11, d_embed=4, d_hidden=6, n_layers=2, forget_bias=2.5)
  with fast_random_bits():
    params = nn.meta.unbox(jit(build(cfg).init)(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))["params"]
  for l in range(cfg.n_layers):
    b = np.asarray(params[f"layer_{l}"]["b"])
    assert b.shape == (4, cfg.d_hidden)
    np.testing.assert_array_equal(b[1], 2.5)  # f
    np.testing.assert_array_equal(b[[0, 2, 3]], 0.0)  # i, g, o


def assert_is_dropout_of(dropped, kept, rate):
  """Every entry of `dropped` is 0 or kept/(1−rate), and both kinds occur."""
  dropped, kept = np.asarray(dropped, np.float64), np.asarray(kept, np.float64)
  zero = dropped == 0
  assert 0.2 < zero.mean() < 0.8
  np.testing.assert_allclose(dropped[~zero], kept[~zero] / (1 - rate), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["rnn", "lstm"])
def test_dropout_acts_on_inputs_never_on_the_recurrent_state(request, arch):
  """With dropout on, each layer still follows its equations exactly, given its dropped input."""
  rate = 0.5
  cfg = dataclasses.replace(request.getfixturevalue(f"{arch}_config"), dropout=rate)
  _, variables, tokens = init_model(cfg, T=8)
  with fast_random_bits():
    out, state = compiled_apply(cfg)(variables, tokens, deterministic=False, rngs={"dropout": jax.random.key(5)},
                                     capture_intermediates=True, mutable="intermediates")
  dropped = state["intermediates"]["Dropout_0"]["__call__"]  # x_t, between layers, before the output
  assert len(dropped) == cfg.n_layers + 1
  p = variables["params"]
  assert_is_dropout_of(dropped[0], p["embed"]["embedding"][tokens], rate)
  zeros = np.zeros((tokens.shape[0], cfg.d_hidden))
  for l in range(cfg.n_layers):
    q = p[f"layer_{l}"]
    if arch == "rnn":
      h_ref, _ = elman_numpy(dropped[l], zeros, q["W"], q["U"], q["b"])
    else:
      h_ref, _ = lstm_numpy(dropped[l], zeros, zeros, q["W"], q["U"], q["b"])
    assert_is_dropout_of(dropped[l + 1], h_ref, rate)
  np.testing.assert_allclose(out.hidden, h_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.logits, dropped[-1] @ p["out"]["kernel"] + p["out"]["bias"], rtol=1e-5, atol=1e-5)


def test_dropout_is_random_in_training_and_off_in_evaluation(config):
  cfg = dataclasses.replace(config, dropout=0.3)
  _, variables, tokens = init_model(cfg)
  apply = compiled_apply(cfg)
  no_dropout = compiled_apply(config)(variables, tokens).logits
  np.testing.assert_allclose(apply(variables, tokens, deterministic=True).logits, no_dropout, rtol=1e-6, atol=1e-6)
  with fast_random_bits():
    train = [apply(variables, tokens, deterministic=False, rngs={"dropout": jax.random.key(s)}).logits
             for s in (1, 1, 2)]
  np.testing.assert_array_equal(train[0], train[1])  # randomness only from the explicit key
  assert np.abs(train[0] - train[2]).max() > 1e-3
  assert np.abs(train[0] - no_dropout).max() > 1e-3


@pytest.mark.parametrize("arch", ["rnn", "lstm", "transformer", "rnn-tied", "lstm-tied"])
def test_logits_are_the_output_layer_applied_to_hidden(request, arch):
  """Untied: h W_out + b_out; tied: h Eᵀ, plus the recurrent models' own output bias b_out (drawn
  nonzero here, so a bias left out shows)."""
  arch, _, tied = arch.partition("-")
  cfg = request.getfixturevalue(f"{arch}_config")
  if tied:
    cfg = dataclasses.replace(cfg, d_hidden=cfg.d_embed, tie_embeddings=True)
  _, variables, tokens = init_model(cfg)
  out, p = compiled_apply(cfg)(variables, tokens), variables["params"]
  if cfg.tie_embeddings:  # logits = h Eᵀ (+ b_out)
    expected = out.hidden @ p["embed"]["embedding"].T
    if arch != "transformer":
      assert np.abs(p["out_bias"]).min() > 0
      expected = expected + p["out_bias"]
  else:
    expected = out.hidden @ p["out"]["kernel"] + p["out"]["bias"]
  np.testing.assert_allclose(out.logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["fnn", "rnn", "lstm", "transformer-learned", "transformer-untied"])
def test_without_logits_the_hidden_states_are_the_same_and_no_output_layer_exists(request, case):
  """`logits=False` (a classifier's body): the same hidden states and carry, and init creates
  every parameter but the output layer's."""
  untied = case == "transformer-untied"
  cfg = case_config(request, "transformer-learned" if untied else case, **({"tie_embeddings": False} if untied else {}))
  model, variables, tokens = init_model(cfg)
  full = compiled_apply(cfg)(variables, tokens)
  bare = jit(functools.partial(model.apply, logits=False))(variables, tokens)
  assert bare.logits is None
  np.testing.assert_array_equal(bare.hidden, full.hidden)
  jax.tree.map(np.testing.assert_array_equal, bare.carry, full.carry)
  names = lambda logits: set(jax.eval_shape(functools.partial(model.init, logits=logits), jax.random.key(0),
                                            tokens)["params"])
  output = {"fnn": {"U", "W"}, "rnn": {"out"}, "lstm": {"out"}, "transformer-learned": set()}.get(case, {"out"})
  assert names(True) - names(False) == output and names(False) <= names(True)


# ----------------------------------------------------------------------------- 5. attention and positions


def attention_setup(pos_encoding, causal, B=2, T=6):
  """MultiHeadAttention with random parameters as a function (B, T, D) → (B, T, D) at positions 0..T−1."""
  cfg = TransformerConfig(vocab_size=11, d_model=16, n_heads=2, n_layers=1, context=8, pos_encoding=pos_encoding)
  mha = MultiHeadAttention(cfg, causal=causal)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((B, T, cfg.d_model)), jnp.float32)
  positions = jnp.arange(T)
  # The module takes the B·T tokens flattened, (N, D), and B.
  variables = random_params(lambda key, x: mha.init(key, x.reshape(B * T, -1), B, positions), x)
  attend = jit(lambda x: mha.apply(variables, x.reshape(B * T, -1), B, positions)[0].reshape(B, T, -1))
  return cfg, attend, x, variables["params"]


PERM = np.array([3, 0, 5, 1, 4, 2])


@pytest.mark.parametrize("pos_encoding", ["none", "rotary"])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_equals_numpy_softmax_formula(pos_encoding, causal):
  """MHA(x) = concat_i softmax(Q_i K_iᵀ/√d_k + M) V_i · W_O (+ biases), rotary on Q and K."""
  cfg, attend, x, p = attention_setup(pos_encoding, causal)
  T, d_k = x.shape[1], cfg.d_head
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  proj = lambda name: np.einsum("btd,dhk->bthk", np.asarray(x, np.float64), p[name]["kernel"]) + p[name]["bias"]
  q, k, v = proj("query"), proj("key"), proj("value")
  heads = np.zeros_like(q)
  for b in range(x.shape[0]):
    for h in range(cfg.n_heads):
      q_h, k_h = q[b, :, h], k[b, :, h]
      if pos_encoding == "rotary":
        q_h, k_h = rotary_numpy(q_h, range(T)), rotary_numpy(k_h, range(T))
      s = q_h @ k_h.T / math.sqrt(d_k)
      if causal:
        s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
      a = np.exp(s - s.max(-1, keepdims=True))
      heads[b, :, h] = (a / a.sum(-1, keepdims=True)) @ v[b, :, h]
  expected = np.einsum("bthk,hkd->btd", heads, p["out"]["kernel"]) + p["out"]["bias"]
  np.testing.assert_allclose(attend(x), expected, rtol=1e-5, atol=1e-5)


def test_attention_without_positions_is_permutation_equivariant():
  _, attend, x, _ = attention_setup("none", causal=False)
  np.testing.assert_allclose(attend(x[:, PERM]), attend(x)[:, PERM], rtol=1e-5, atol=1e-5)


def test_rotary_attention_is_not_permutation_equivariant():
  _, attend, x, _ = attention_setup("rotary", causal=False)
  assert np.abs(attend(x[:, PERM]) - attend(x)[:, PERM]).max() > 1e-3


@pytest.mark.parametrize("positions", ["sinusoidal", "learned"])
def test_added_positions_break_permutation_equivariance(positions):
  """h⁰ = x + P: permuting x alone changes the output, permuting x and P together does not."""
  cfg, attend, x, _ = attention_setup("none", causal=False)
  T = x.shape[1]
  if positions == "sinusoidal":
    P = sinusoidal_positions(jnp.arange(T), cfg.d_model)
  else:  # a learned table is any (T_max, D) matrix
    P = jnp.asarray(np.random.default_rng(3).standard_normal((cfg.context, cfg.d_model))[:T], jnp.float32)
  assert np.abs(attend(x[:, PERM] + P) - attend(x + P)[:, PERM]).max() > 1e-3
  np.testing.assert_allclose(attend(x[:, PERM] + P[PERM]), attend(x + P)[:, PERM], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pos_encoding", ["none", "sinusoidal", "learned", "rotary"])
def test_transformer_sees_the_order_of_earlier_tokens_only_through_positions(transformer_config, pos_encoding):
  """Causal attention with P = 0 sees the earlier tokens as a set: reordering w_1..w_{T−1} leaves
  logits_T unchanged (with one layer; deeper, the keys at s depend on the order before s). Every
  positional encoding must break that."""
  cfg = dataclasses.replace(transformer_config, pos_encoding=pos_encoding, n_layers=1)
  _, variables, _ = init_model(cfg)
  apply = compiled_apply(cfg)
  tokens = jnp.asarray([[1, 2, 3, 4, 5, 6, 7, 8]], jnp.int32)
  shuffled = jnp.asarray([[5, 3, 7, 1, 6, 2, 4, 8]], jnp.int32)
  diff = np.abs(apply(variables, tokens).logits[:, -1] - apply(variables, shuffled).logits[:, -1]).max()
  if pos_encoding == "none":
    assert diff < 1e-5
  else:
    assert diff > 1e-3


def test_sinusoidal_positions_follow_the_formula():
  T, D = 50, 16
  t, i = np.arange(T)[:, None], np.arange(D // 2)[None, :]
  expected = np.zeros((T, D))
  expected[:, 0::2] = np.sin(t / 10000.0 ** (2 * i / D))
  expected[:, 1::2] = np.cos(t / 10000.0 ** (2 * i / D))
  np.testing.assert_allclose(jit(sinusoidal_positions, static_argnums=1)(jnp.arange(T), D), expected,
                             rtol=0, atol=2e-5)


def test_rotary_matches_formula_and_makes_scores_depend_on_t_minus_s_only():
  d_k = 8
  rng = np.random.default_rng(0)
  q, k = (jnp.asarray(rng.standard_normal((1, 1, 1, d_k)), jnp.float32) for _ in range(2))
  rotate = jit(lambda x, t: apply_rotary(x, t[None])[0, 0, 0])
  np.testing.assert_allclose(rotate(q, 7), rotary_numpy(q[0, :, 0], [7])[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(rotate(q, 7)), np.linalg.norm(q), rtol=1e-5)  # a rotation
  score = lambda t, s: float(rotate(q, jnp.int32(t)) @ rotate(k, jnp.int32(s)))
  for t, s in [(3, 1), (5, 5), (2, 6), (0, 4)]:
    for shift in (1, 7, 20):
      np.testing.assert_allclose(score(t + shift, s + shift), score(t, s), rtol=1e-4, atol=1e-4)
  assert abs(score(3, 1) - score(3, 2)) > 1e-3  # but it does depend on t − s


# ----------------------------------------------------------------------------- 6. parameter count


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("V, n, m, h", [(13, 4, 8, 16), (17, 2, 3, 5)])
def test_fnn_parameter_count_is_the_papers(direct, V, n, m, h):
  cfg = FNNConfig(vocab_size=V, context=n, d_embed=m, d_hidden=h, direct=direct)
  shapes = jax.eval_shape(build(cfg).init, jax.random.key(0), jnp.zeros((1, 3), jnp.int32))["params"]
  counted = sum(math.prod(s.shape) for s in jax.tree.leaves(nn.meta.unbox(shapes)))
  if direct:  # b, W and C: |V|(1 + (n−1)m + m); U: |V|h; d and H: h(1 + (n−1)m)
    paper = V * (1 + n * m + h) + h * (1 + (n - 1) * m)
  else:
    paper = V * (1 + h) + h * (1 + (n - 1) * m) + V * m
  assert counted == paper == cfg.num_params()


# ----------------------------------------------------------------------------- 7. overfitting one batch


def rule_batch(vocab: int, B: int = 4, T: int = 12):
  """w_{t+1} = (w_t + w_{t−1}) mod V after two seed tokens, first tokens distinct: every prefix,
  and every window of ≥ 2 tokens, fixes the next token, so the loss can go to 0."""
  rows = []
  for b in range(B):
    w = [b + 1, (3 * b + 2) % vocab]
    while len(w) < T:
      w.append((w[-1] + w[-2]) % vocab)
    rows.append(w)
  return jnp.asarray(rows, jnp.int32)


def test_tiny_model_fits_one_batch(config):
  tokens = rule_batch(config.vocab_size)
  model, variables, _ = init_model(config, scale=0.1)
  optimizer = optax.adam(0.02)

  @jit
  def train(params):
    def step(carry, _):
      params, opt_state = carry
      loss, grads = jax.value_and_grad(lambda p: mean_nll(model, {"params": p}, tokens))(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), length=300)
    return losses, mean_nll(model, {"params": params}, tokens)

  losses, final = train(variables["params"])
  assert float(losses[0]) > 2.0 and float(final) < 0.05, (float(losses[0]), float(final))


# ----------------------------------------------------------------------------- 8. config errors


VOCAB = 13
INVALID_CONFIGS = [
    (TransformerConfig, dict(d_model=10, n_heads=4), "d_model"),
    (TransformerConfig, dict(pos_encoding="alibi"), "pos_encoding"),
    (TransformerConfig, dict(pos_encoding="rotary", d_model=12, n_heads=4), "d_model"),
    (TransformerConfig, dict(n_heads=0), "n_heads"),
    (TransformerConfig, dict(d_ff=0), "d_ff"),
    (TransformerConfig, dict(context=0), "context"),
    (FNNConfig, dict(context=1), "context"),
    (FNNConfig, dict(context=0), "context"),
    (FNNConfig, dict(bos_id=VOCAB), "bos_id"),
    (RNNConfig, dict(d_embed=8, d_hidden=12, tie_embeddings=True), "tie_embeddings"),
    (LSTMConfig, dict(d_embed=8, d_hidden=12, tie_embeddings=True), "tie_embeddings"),
    (RNNConfig, dict(activation="sigmoid"), "activation"),
    (LSTMConfig, dict(n_layers=0), "n_layers"),
    (TransformerConfig, dict(attn_dropout=1.0), "attn_dropout"),
    (TransformerConfig, dict(attention="flash"), "attention"),
    (TransformerConfig, dict(attention="cudnn", dropout=0.1), "attention"),
] + [(cls, fields, field)
     for cls in (FNNConfig, RNNConfig, LSTMConfig, TransformerConfig)
     for fields, field in [(dict(vocab_size=0), "vocab_size"), (dict(vocab_size=-3), "vocab_size"),
                           (dict(vocab_size=2.5), "vocab_size"),
                           (dict(dropout=-0.1), "dropout"), (dict(dropout=1.0), "dropout"),
                           (dict(dropout="0.1"), "dropout"), (dict(dropout=None), "dropout"),
                           (dict(dtype="float8"), "dtype"), (dict(param_dtype="int32"), "param_dtype"),
                           (dict(embed_method="lookup"), "embed_method"),
                           (dict(matmul_precision="fastest"), "matmul_precision")]]


@pytest.mark.parametrize("cls, fields, field", INVALID_CONFIGS,
                         ids=[f"{c.__name__}-{'-'.join(f'{k}={v}' for k, v in f.items())}" for c, f, _ in INVALID_CONFIGS])
def test_invalid_config_raises_value_error_naming_the_field(cls, fields, field):
  with pytest.raises(ValueError, match=rf"(?<!\w){field}="):
    cls(**{"vocab_size": VOCAB, **fields})


def test_config_from_dict_round_trips_and_rejects_unknown_fields_and_archs(config):
  fields = config_to_dict(config)
  assert config_from_dict(fields) == config
  with pytest.raises(ValueError, match="'d_modle'"):
    config_from_dict({**fields, "d_modle": 3})
  with pytest.raises(ValueError, match="arch='gru'"):
    config_from_dict({**fields, "arch": "gru"})
  with pytest.raises(ValueError, match="arch=None"):
    config_from_dict({"vocab_size": VOCAB})
  with pytest.raises(ValueError, match="vocab_size="):
    config_from_dict({**fields, "vocab_size": 0})


# ----------------------------------------------------------------------------- 10. jit, grad, vmap


def test_vmap_over_sequences_equals_the_batched_call(config):
  model, variables, tokens = init_model(config, B=3, T=8)
  batched = compiled_apply(config)(variables, tokens)
  one = lambda row_T: model.apply(variables, row_T[None]).logits[0]
  np.testing.assert_allclose(jit(jax.vmap(one))(tokens), batched.logits, rtol=1e-5, atol=1e-5)


def test_per_sequence_gradients_by_vmap_average_to_the_batch_gradient(rnn_config):
  """Rows have equal token counts, so the batch mean NLL is the mean of the rows' means. (One
  architecture: vmap of grad through the Transformer costs seconds of compile on CPU.)"""
  model, variables, tokens = init_model(rnn_config, B=3, T=8)
  loss = lambda p, toks: mean_nll(model, {"params": p}, toks)
  batch_grad, row_grads = jit(lambda p: (jax.grad(loss)(p, tokens),
                                             jax.vmap(jax.grad(loss), in_axes=(None, 0))(p, tokens[:, None])))(
                                                 variables["params"])
  assert_trees_close(jax.tree.map(lambda g: g.mean(0), row_grads), batch_grad, rtol=1e-4, atol=1e-6)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(batch_grad)) > 1e-3


def test_scan_layers_equals_the_unrolled_stack(transformer_config):
  """nn.scan over layers computes the same function, with the per-layer parameters stacked."""
  _, variables, tokens = init_model(transformer_config)
  p = dict(variables["params"])
  blocks = [p.pop(f"block_{l}") for l in range(transformer_config.n_layers)]
  scanned = dataclasses.replace(transformer_config, scan_layers=True)
  stacked = {**p, "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}
  _, scanned_variables, _ = init_model(scanned)
  assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, scanned_variables["params"])
  np.testing.assert_allclose(compiled_apply(scanned)({"params": stacked}, tokens).logits,
                             compiled_apply(transformer_config)(variables, tokens).logits, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- 11. bfloat16 compute


def test_bfloat16_compute_is_close_to_float32(config):
  _, variables, tokens = init_model(config, B=4, T=10)
  bf16 = dataclasses.replace(config, dtype="bfloat16")
  out = jax.eval_shape(build(bf16).apply, variables, tokens)
  # The Transformer keeps its residual stream and logits in float32 (mixed precision policy).
  expected = jnp.float32 if config.arch == "transformer" else jnp.bfloat16
  assert out.logits.dtype == expected and out.hidden.dtype == expected
  loss32, loss16 = float(compiled_loss(config)(variables, tokens)), float(compiled_loss(bf16)(variables, tokens))
  assert np.isfinite(loss16) and loss16 != loss32
  assert abs(loss16 - loss32) < 0.01 * loss32, (loss16, loss32)


def test_transformer_bfloat16_policy_runs_matmuls_in_bfloat16_and_the_rest_in_float32(transformer_config):
  """dtype=bfloat16: every matrix product of the layers takes bfloat16 operands; LayerNorm, the
  residual additions and the softmax stay float32; parameters stay float32."""
  _, variables, tokens = init_model(transformer_config, B=2, T=6)
  bf16 = dataclasses.replace(transformer_config, dtype="bfloat16", embed_method="gather", attention="xla")
  jaxpr = jax.make_jaxpr(lambda v: build(bf16).apply(v, tokens))(variables).jaxpr
  dots = [e for e in all_eqns(jaxpr) if e.primitive.name == "dot_general"]
  # q, k, v, W_O, W1, W2 per layer, QKᵀ and PV per layer, and the tied output projection.
  assert len(dots) == 8 * transformer_config.n_layers + 1
  assert all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars), [
      [v.aval.dtype for v in e.invars] for e in dots]
  _, inter = build(bf16).apply(variables, tokens, capture_intermediates=True)
  inter = inter["intermediates"]
  for l in range(transformer_config.n_layers):
    block = inter[f"block_{l}"]
    assert block["__call__"][0][0].dtype == jnp.float32  # the residual stream h^ℓ
    assert block["ln1"]["__call__"][0].dtype == block["ln2"]["__call__"][0].dtype == jnp.float32
    assert block["ffn"]["w1"]["__call__"][0].dtype == jnp.bfloat16
  assert inter["ln_f"]["__call__"][0].dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("arch", ["transformer", "lstm", "fnn"])
def test_sampling_paths_agree(request, arch):
  """Streamed, compiled-loop and recomputed decoding draw the same tokens from the same key,
  and greedy decoding follows the argmax of the full forward pass."""
  from nlm_jax.generate import Sampler

  cfg = request.getfixturevalue(f"{arch}_config")
  model, variables, _ = init_model(cfg, scale=1.0)
  params = variables["params"]
  prompt, n, key = [1, 2, 3], 5, jax.random.key(7)
  sampler = Sampler(model, params, temperature=0.8, top_k=4)
  streamed = []
  a = sampler.generate(prompt, n, key, on_token=streamed.append)
  b = sampler.generate(prompt, n, key)
  c = sampler.generate(prompt, n, key, use_cache=False, window=len(prompt) + n)
  assert a == b == c and streamed == a[len(prompt):] and len(a) == len(prompt) + n
  hot = Sampler(model, params, temperature=5.0)  # nearly uniform: another key, another text
  assert hot.generate(prompt, 8, jax.random.key(8)) != hot.generate(prompt, 8, key)
  greedy = Sampler(model, params, temperature=0.0).generate(prompt, n, key)
  full = model.apply(variables, jnp.asarray([greedy[:-1]], jnp.int32)).logits[0]
  assert greedy[len(prompt):] == [int(i) for i in np.argmax(full, axis=-1)[len(prompt) - 1:]]


# ----------------------------------------------------------------------------- 12. embedding, attention dropout, precision


def test_embed_method_auto_is_one_hot_on_accelerators_for_small_vocabularies():
  assert layers.embed_method("auto", 65, "cpu") == "gather"
  assert layers.embed_method("auto", 65, "gpu") == layers.embed_method("auto", 65, "tpu") == "one_hot"
  assert layers.embed_method("auto", layers.ONE_HOT_MAX_VOCAB + 1, "gpu") == "gather"
  assert layers.embed_method("one_hot", 50_000, "cpu") == "one_hot"
  assert layers.embed_method("gather", 65, "gpu") == "gather"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_hot_embedding_equals_the_lookup_and_its_gradient_the_scatter_add(dtype):
  """onehot(w) E selects the rows E[w] exactly (also at the default matmul precision, TF32 on a
  GPU), and its gradient onehot(w)ᵀ g sums g over each token's positions like the scatter-add."""
  V, D = 37, 24
  ids = jnp.asarray(np.random.default_rng(0).integers(0, V, (5, 50)) % 7, jnp.int32)  # frequent ids repeat
  E = jnp.asarray(np.random.default_rng(1).standard_normal((V, D)), jnp.float32)
  g = jnp.asarray(np.random.default_rng(2).standard_normal((5, 50, D)), jnp.float32)

  def embed(method, E):
    module = layers.Embed(V, D, nn.initializers.zeros, method=method, dtype=jnp.dtype(dtype))
    with jax.default_matmul_precision("default"):
      return module.apply({"params": {"embedding": E}}, ids)

  for_method = {m: jax.jit(functools.partial(embed, m)) for m in ("gather", "one_hot")}
  np.testing.assert_array_equal(for_method["one_hot"](E), for_method["gather"](E))
  np.testing.assert_array_equal(for_method["gather"](E), E[ids].astype(dtype))
  grads = {m: jax.grad(lambda E: jnp.sum(f(E).astype(jnp.float32) * g))(E) for m, f in for_method.items()}
  expected = np.zeros((V, D))
  np.add.at(expected, np.asarray(ids), np.asarray(g.astype(dtype), np.float64))  # the cotangent of a bf16 output is bf16
  for m in grads:
    np.testing.assert_allclose(grads[m], expected, rtol=1e-5, atol=1e-5)
  assert np.abs(expected[7:]).max() == 0 and np.abs(expected[:7]).min() > 0


def test_every_model_gives_the_same_logits_with_either_embedding(config):
  _, variables, tokens = init_model(config)
  gather = compiled_apply(dataclasses.replace(config, embed_method="gather"))(variables, tokens).logits
  one_hot = compiled_apply(dataclasses.replace(config, embed_method="one_hot"))(variables, tokens).logits
  np.testing.assert_allclose(one_hot, gather, rtol=1e-6, atol=1e-6)
  jaxpr = str(jax.make_jaxpr(lambda v: build(dataclasses.replace(config, embed_method="one_hot")).apply(v, tokens))(
      variables))
  assert "gather" not in jaxpr.replace("take_along_axis", "")  # no lookup left: no scatter-add in the gradient


def test_attention_dropout_zeroes_probabilities_and_rescales_the_rest():
  """With V = I (value s is the unit vector e_s), the output row t is the dropped row t of
  softmax(QKᵀ/√d_k + M): each entry is 0 or P_ts/(1−p); masked entries stay 0."""
  T, rate = 16, 0.4
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((2, T, 3, T)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((2, T, 3, T)), jnp.float32)
  v = jnp.broadcast_to(jnp.eye(T)[None, :, None, :], (2, T, 3, T))
  mask = jnp.tril(jnp.ones((T, T), bool))
  P = np.asarray(dot_product_attention(q, k, v, mask)).transpose(0, 2, 1, 3)  # (B, H, T, S) probabilities
  s = np.einsum("bthk,bshk->bhts", q, k) / math.sqrt(T)
  s = np.where(mask, s, -np.inf)
  np.testing.assert_allclose(P, np.exp(s - s.max(-1, keepdims=True)) / np.exp(s - s.max(-1, keepdims=True)).sum(
      -1, keepdims=True), rtol=1e-5, atol=1e-6)
  dropped = np.asarray(dot_product_attention(q, k, v, mask, rate, jax.random.key(3))).transpose(0, 2, 1, 3)
  assert np.all(dropped[:, :, ~np.asarray(mask)] == 0)
  causal = np.broadcast_to(np.asarray(mask), dropped.shape)
  assert_is_dropout_of(dropped[causal], P[causal], rate)
  again = np.asarray(dot_product_attention(q, k, v, mask, rate, jax.random.key(3))).transpose(0, 2, 1, 3)
  np.testing.assert_array_equal(again, dropped)


def test_transformer_drops_attention_probabilities_in_training_only(transformer_config):
  """attn_dropout alone (dropout=0) changes the training forward, and only through attention:
  the first position attends to itself only, so its dropped probability 1 → {0, 1/(1−p)} scales
  the whole head output, and position 0's hidden state is one of 2^H head combinations."""
  cfg = dataclasses.replace(transformer_config, dropout=0.0, attn_dropout=0.5, n_layers=1)
  _, variables, tokens = init_model(cfg, B=8, T=6)
  apply = compiled_apply(cfg)
  evaluation = apply(variables, tokens, deterministic=True).logits
  np.testing.assert_allclose(evaluation, compiled_apply(dataclasses.replace(cfg, attn_dropout=0.0))(
      variables, tokens, deterministic=False, rngs={"dropout": jax.random.key(0)}).logits, rtol=1e-6, atol=1e-6)
  train = apply(variables, tokens, deterministic=False, rngs={"dropout": jax.random.key(0)}).logits
  assert np.abs(train - evaluation).max() > 1e-3
  # Position 0: attention output = Σ_h m_h v_0^h W_O^h + b_O with m_h ∈ {0, 2}; try all masks.
  p = variables["params"]["block_0"]
  ln = lambda x, q: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * q["scale"] + q["bias"]
  E, P0 = np.asarray(variables["params"]["embed"]["embedding"]), np.asarray(variables["params"]["pos_embed"][0])
  x0 = E[np.asarray(tokens[:, 0])] + P0
  v0 = np.einsum("bd,dhk->bhk", ln(x0, p["ln1"]), p["attn"]["value"]["kernel"]) + p["attn"]["value"]["bias"]
  head_out = np.einsum("bhk,hkd->bhd", v0, p["attn"]["out"]["kernel"])  # (B, H, D)
  out = variables["params"]
  gelu = lambda x: np.asarray(nn.gelu(jnp.asarray(x)))
  found = []
  for b in range(tokens.shape[0]):
    candidates = []
    for m in np.ndindex(*(2,) * cfg.n_heads):
      a = x0[b] + np.einsum("h,hd->d", 2.0 * np.asarray(m), head_out[b]) + p["attn"]["out"]["bias"]
      h = a + gelu(ln(a, p["ln2"]) @ p["ffn"]["w1"]["kernel"] + p["ffn"]["w1"]["bias"]) @ p["ffn"]["w2"]["kernel"] \
          + p["ffn"]["w2"]["bias"]
      candidates.append(ln(h, out["ln_f"]) @ E.T)
    errors = [np.abs(c - train[b, 0]).max() for c in candidates]
    found.append(int(np.argmin(errors)))
    assert min(errors) < 1e-4, errors
  assert len(set(found)) > 1  # different rows drop different heads


def test_attention_auto_takes_cudnn_on_gpu_for_half_precision_without_dropout(transformer_config):
  bf16 = dataclasses.replace(transformer_config, dtype="bfloat16")
  assert attention_impl(bf16, dropout_active=False, cached=False, backend="gpu", deterministic_ops=False) == "cudnn"
  # XLA cannot compile cuDNN attention's backward pass under deterministic ops (seen on an H200)
  assert attention_impl(bf16, dropout_active=False, cached=False, backend="gpu", deterministic_ops=True) == "xla"
  assert attention_impl(bf16, dropout_active=True, cached=False, backend="gpu") == "xla"
  assert attention_impl(bf16, dropout_active=False, cached=True, backend="gpu") == "xla"
  assert attention_impl(bf16, dropout_active=False, cached=False, backend="cpu") == "xla"
  assert attention_impl(transformer_config, dropout_active=False, cached=False, backend="gpu") == "xla"
  assert attention_impl(dataclasses.replace(bf16, attention="xla"), False, False, backend="gpu") == "xla"


def test_matmul_precision_reaches_every_matrix_product_forward_and_backward(config):
  """model.matmul_precision='highest' pins every dot_general of the forward and backward pass,
  whatever the global default; None leaves the global default in place."""
  _, variables, tokens = init_model(config)

  def precisions(cfg):
    model = build(cfg)
    loss = lambda v: jnp.sum(model.apply(v, tokens).logits)
    with jax.default_matmul_precision("default"):
      jaxpr = jax.make_jaxpr(jax.grad(loss))(variables)
    return [e.params["precision"] for e in all_eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]

  pinned = precisions(dataclasses.replace(config, matmul_precision="highest", embed_method="gather"))
  assert len(pinned) >= 3
  assert all(p is not None and all(x == jax.lax.Precision.HIGHEST for x in p) for p in pinned), pinned
  default = precisions(dataclasses.replace(config, matmul_precision=None, embed_method="gather"))
  assert len(default) == len(pinned)
  assert any(p is None or any(x != jax.lax.Precision.HIGHEST for x in p) for p in default), default


def test_our_attention_equals_jax_nn_dot_product_attention():
  """The 'xla' path computes what jax.nn.dot_product_attention (whose cuDNN kernel 'cudnn' calls)
  computes, causal and not."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 7, 3, 8)), jnp.float32) for _ in range(3))
  for causal in (True, False):
    mask = jnp.tril(jnp.ones((7, 7), bool)) if causal else None
    np.testing.assert_allclose(dot_product_attention(q, k, v, mask),
                               jax.nn.dot_product_attention(q, k, v, is_causal=causal), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_attention_gives_the_xla_results_within_bfloat16_tolerance(transformer_config):
  cfg = dataclasses.replace(transformer_config, dtype="bfloat16", d_model=64, n_heads=2, context=16)
  _, variables, tokens = init_model(cfg, B=4, T=16)
  exact = np.asarray(build(dataclasses.replace(cfg, dtype="float32", attention="xla")).apply(variables, tokens).logits)
  xla = np.asarray(build(dataclasses.replace(cfg, attention="xla")).apply(variables, tokens).logits, np.float32)
  cudnn = np.asarray(build(dataclasses.replace(cfg, attention="cudnn")).apply(variables, tokens).logits, np.float32)

  def error(x):  # relative to the float32 logits, over the whole array
    return float(np.linalg.norm(x - exact) / np.linalg.norm(exact))

  # Both bf16 paths round differently (single elements can differ by ~0.1 on logits of ~6), but
  # cuDNN's kernel is no further from the exact float32 result than XLA's bf16 attention.
  assert error(xla) < 2e-2 and error(cudnn) < max(2 * error(xla), 5e-3), (error(xla), error(cudnn))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="tests the fallback where cuDNN is absent")
def test_auto_attention_falls_back_to_xla_where_cudnn_is_missing(transformer_config, monkeypatch, caplog):
  """attention='auto' taking cuDNN on a (pretend) GPU without cuDNN warns and computes XLA's
  result; attention='cudnn' asked for explicitly raises instead."""
  cfg = dataclasses.replace(transformer_config, dtype="bfloat16")
  _, variables, tokens = init_model(cfg)
  expected = build(dataclasses.replace(cfg, attention="xla")).apply(variables, tokens).logits
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(runtime, "deterministic_ops", lambda: False)  # the suite runs with them on
  assert attention_impl(cfg, dropout_active=False, cached=False) == "cudnn"
  with caplog.at_level("WARNING"):
    got = build(cfg).apply(variables, tokens).logits
  assert "cuDNN fused attention unavailable" in caplog.text
  np.testing.assert_array_equal(got, expected)
  with pytest.raises(RuntimeError):
    build(dataclasses.replace(cfg, attention="cudnn")).apply(variables, tokens)


@pytest.mark.parametrize("pos_encoding", ["sinusoidal", "learned", "rotary", "none"])
def test_first_hidden_state_is_the_embedding_plus_positions(transformer_config, pos_encoding):
  """h⁰_t = E[w_t] + P_t (learned), √D·E[w_t] + P_t (sinusoidal, Vaswani et al.), E[w_t] (rotary, none),
  at the positions of a call that continues a KV cache too."""
  cfg = dataclasses.replace(transformer_config, pos_encoding=pos_encoding)
  model, variables, tokens = init_model(cfg, B=2, T=5)
  p = variables["params"]
  E = np.asarray(p["embed"]["embedding"])
  cache = model.apply(variables, tokens[:, :3], model.initial_carry(2)).carry  # positions 3, 4 next
  _, state = model.apply(variables, tokens[:, 3:], cache, mutable="intermediates")
  h0 = np.asarray(state["intermediates"]["h0"][0])
  expected = E[np.asarray(tokens[:, 3:])]
  if pos_encoding == "learned":
    expected = expected + np.asarray(p["pos_embed"])[3:5]
  elif pos_encoding == "sinusoidal":
    expected = math.sqrt(cfg.d_model) * expected + np.asarray(sinusoidal_positions(jnp.arange(3, 5), cfg.d_model))
  np.testing.assert_allclose(h0, expected, rtol=1e-6, atol=1e-6)
