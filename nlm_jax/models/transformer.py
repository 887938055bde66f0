r"""Decoder-only Transformer language model (Vaswani et al. 2017; pre-LayerNorm as in GPT-2).

Tokens w_1..w_T, embedding matrix E ∈ R^{|V|×D}, L layers, H heads of size d_k = D/H:

    h⁰_t = E[w_t] + P_t                              (P_t: learned; 0 for rotary/none)
    h⁰_t = √D·E[w_t] + P_t                           (P_t sinusoidal, as Vaswani et al.: the
                                                       embedding's scale then matches P's)
    a^ℓ  = h^{ℓ−1} + MHA(LN(h^{ℓ−1}))                 ℓ = 1..L
    h^ℓ  = a^ℓ + FFN(LN(a^ℓ)),        FFN(x) = GELU(x W₁ + b₁) W₂ + b₂,   W₁ ∈ R^{D×F}
    logits_t = LN(h^L_t) Eᵀ   (tied)  or  LN(h^L_t) W_out + b_out

    MHA(x) = concat(head_1..head_H) W_O,
    head_i = softmax(Q_i K_iᵀ / √d_k + M) V_i,   Q_i = x W_Q^i, K_i = x W_K^i, V_i = x W_V^i,
    M_{ts} = 0 if s ≤ t else −∞                   (causal mask: position t sees s ≤ t only)

Dropout (rate p, training only) acts where GPT-2 and nanoGPT put it: on h⁰ (embeddings +
positions), on the attention probabilities softmax(·) before they weight V (`attn_dropout`,
default p), and on the outputs of W_O and W₂ before each residual addition.

Precision. `dtype` is the dtype of the matrix products; the residual stream h^ℓ, the LayerNorms,
the softmax and the logits stay in float32 (or wider), and parameters are stored in
`param_dtype` — with `dtype=bfloat16` this is the mixed-precision policy of PyTorch's autocast
(bf16 matmuls with float32 accumulation, everything else float32). `matmul_precision` sets the
precision of float32 products (None: the backend's default, TF32 on recent NVIDIA GPUs;
'highest': exact float32). `attention`: 'xla' computes softmax(QKᵀ/√d_k + M)V as written;
'cudnn' calls cuDNN's fused (flash) attention through `jax.nn.dot_product_attention`; 'auto'
takes cuDNN on a GPU for bfloat16/float16 when no attention dropout is active, no KV cache is
used and XLA's deterministic ops are off (`train.deterministic=false`: XLA cannot compile cuDNN
attention's backward pass deterministically), XLA otherwise. Measured on an H200 (nanoGPT's
6×384 step, B=64, T=256, bf16, no dropout): cuDNN 5.44 ms, XLA 8.68 ms (deterministic ops).

Positional encodings (`pos_encoding`):
    sinusoidal  P_{t,2i} = sin(t / 10000^{2i/D}),   P_{t,2i+1} = cos(t / 10000^{2i/D})
    learned     P ∈ R^{T_max×D} is a parameter
    rotary      q_t, k_t rotated pairwise by the angles t·θ_i, θ_i = 10000^{−2i/d_k}
                (Su et al. 2021), so q_tᵀ k_s depends on t − s only
    none        P = 0: attention alone is then permutation-equivariant

Decoding with a KV cache: the carry holds K and V of every layer for positions < index; a call
with tokens at positions index..index+T−1 appends their K, V and attends over the cache with the
same mask M, so step-by-step decoding gives the logits of the full forward pass.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import ClassVar, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from nlm_jax import runtime
from nlm_jax.models import layers
from nlm_jax.models.layers import LMOutput, constrain, param_init

Array = jax.Array
POS_ENCODINGS = ("sinusoidal", "learned", "rotary", "none")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Decoder-only Transformer. D = d_model, H = n_heads, L = n_layers, F = d_ff, T_max = context."""

  arch: ClassVar[str] = "transformer"
  vocab_size: int
  d_model: int = 128
  n_heads: int = 4
  n_layers: int = 4
  d_ff: Optional[int] = None  # F; None means 4·D
  context: int = 64  # T_max: the longest sequence (learned positions, KV-cache length)
  pos_encoding: str = "learned"
  dropout: float = 0.0  # p: on embeddings and residual branches (and attention, unless attn_dropout)
  attn_dropout: Optional[float] = None  # on attention probabilities; None = dropout
  attention: str = "auto"  # 'auto' | 'xla' | 'cudnn' (fused flash attention, GPU, bf16/fp16)
  embed_method: str = "auto"  # 'auto' | 'gather' | 'one_hot' (layers.embed_method)
  matmul_precision: Optional[str] = None  # float32 matmuls: None (backend default) | 'highest' | ...
  tie_embeddings: bool = True
  use_bias: bool = True  # biases in dense layers and LayerNorms
  scan_layers: bool = False  # nn.scan over layers: compile time flat in depth
  remat: bool = False  # recompute each layer's activations in the backward pass
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"

  def __post_init__(self):
    layers.check_common(self)
    layers.positive(self, "d_model", "n_heads", "n_layers", "context")
    layers.require(self.d_model % self.n_heads == 0, "d_model", self.d_model,
                   f"must be divisible by n_heads={self.n_heads}")
    layers.require(self.d_ff is None or (isinstance(self.d_ff, int) and self.d_ff > 0), "d_ff",
                   self.d_ff, "must be a positive integer or null (4·d_model)")
    layers.require(self.pos_encoding in POS_ENCODINGS, "pos_encoding", self.pos_encoding,
                   f"allowed: {', '.join(POS_ENCODINGS)}")
    layers.require(self.attn_dropout is None or (isinstance(self.attn_dropout, (int, float))
                                                 and 0.0 <= self.attn_dropout < 1.0),
                   "attn_dropout", self.attn_dropout, "must be null or a number in [0, 1)")
    layers.require(self.attention in ATTENTION_IMPLS, "attention", self.attention,
                   f"allowed: {', '.join(ATTENTION_IMPLS)}")
    layers.require(self.attention != "cudnn" or self.attn_dropout_rate == 0.0, "attention", self.attention,
                   "cuDNN's fused attention has no dropout on the probabilities: set attn_dropout=0 or attention=auto")
    layers.require(self.pos_encoding != "rotary" or (self.d_model // self.n_heads) % 2 == 0,
                   "d_model", self.d_model, "rotary needs an even head size d_model/n_heads")

  @property
  def d_head(self) -> int:
    return self.d_model // self.n_heads

  @property
  def hidden_size(self) -> int:
    return self.d_model

  @property
  def attn_dropout_rate(self) -> float:
    return self.dropout if self.attn_dropout is None else self.attn_dropout

  @property
  def residual_dtype(self):
    """The residual stream's dtype: float32, or float64 for a float64 model."""
    return jnp.promote_types(jnp.promote_types(self.dtype, self.param_dtype), jnp.float32)


class KVCache(NamedTuple):
  """K and V of every layer and the next write position. With `scan_layers` k and v are stacked,
  (L, B, T_max, H, d_k) each; otherwise tuples of L arrays (B, T_max, H, d_k), so that a decoding
  step updates each layer's cache in place instead of slicing and re-stacking all of them."""

  k: Array | tuple[Array, ...]
  v: Array | tuple[Array, ...]
  index: Array  # int32 scalar: number of positions already in the cache


# ----------------------------------------------------------------------------- positions


def sinusoidal_positions(positions_T: Array, d_model: int) -> Array:
  """P_{t,2i} = sin(t/10000^{2i/D}), P_{t,2i+1} = cos(t/10000^{2i/D}); returns (T, D)."""
  inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, d_model, 2, dtype=jnp.float32) / d_model))
  angle_TxD2 = positions_T.astype(jnp.float32)[:, None] * inv_freq[None, :]
  P_TxD = jnp.zeros((positions_T.shape[0], d_model), jnp.float32)
  P_TxD = P_TxD.at[:, 0::2].set(jnp.sin(angle_TxD2))
  return P_TxD.at[:, 1::2].set(jnp.cos(angle_TxD2[:, : d_model // 2]))


def apply_rotary(x_BxTxHxK: Array, positions_T: Array) -> Array:
  """Rotates each pair (x_{2i}, x_{2i+1}) by the angle t·θ_i, θ_i = 10000^{−2i/d_k}."""
  d_k = x_BxTxHxK.shape[-1]
  theta = 1.0 / (10000.0 ** (jnp.arange(0, d_k, 2, dtype=jnp.float32) / d_k))
  angle_TxK2 = positions_T.astype(jnp.float32)[:, None] * theta[None, :]
  cos = jnp.cos(angle_TxK2)[None, :, None, :]
  sin = jnp.sin(angle_TxK2)[None, :, None, :]
  x1, x2 = x_BxTxHxK[..., 0::2], x_BxTxHxK[..., 1::2]
  rotated = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
  return rotated.reshape(x_BxTxHxK.shape).astype(x_BxTxHxK.dtype)


# ----------------------------------------------------------------------------- layers


def dot_product_attention(q_BxTxHxK: Array, k_BxSxHxK: Array, v_BxSxHxK: Array,
                          mask_TxS: Optional[Array] = None, dropout_rate: float = 0.0,
                          dropout_key: Optional[Array] = None) -> Array:
  """softmax(Q Kᵀ/√d_k + M) V for every head; M = −∞ where `mask_TxS` is False.

  With a `dropout_key`, each probability is zeroed with probability `dropout_rate` and the kept
  ones scaled by 1/(1 − rate) before they weight V (GPT-2's attention dropout).
  Scores and softmax run in float32, or float64 for float64 inputs (`jax.nn.dot_product_attention`
  always rounds the softmax to float32, which breaks float64 models).
  """
  dtype = jnp.promote_types(q_BxTxHxK.dtype, jnp.float32)
  s_BxHxTxS = jnp.einsum("bthk,bshk->bhts", q_BxTxHxK, k_BxSxHxK,
                         preferred_element_type=dtype) / math.sqrt(q_BxTxHxK.shape[-1])
  if mask_TxS is not None:
    s_BxHxTxS = jnp.where(mask_TxS, s_BxHxTxS, -jnp.inf)
  p_BxHxTxS = jax.nn.softmax(s_BxHxTxS, axis=-1)
  if dropout_key is not None and dropout_rate > 0.0:
    keep_BxHxTxS = jax.random.bernoulli(dropout_key, 1.0 - dropout_rate, p_BxHxTxS.shape)
    p_BxHxTxS = jnp.where(keep_BxHxTxS, p_BxHxTxS / (1.0 - dropout_rate), 0.0)
  return jnp.einsum("bhts,bshk->bthk", p_BxHxTxS.astype(v_BxSxHxK.dtype), v_BxSxHxK)


def cudnn_attention(q_BxTxHxK: Array, k_BxTxHxK: Array, v_BxTxHxK: Array, causal: bool,
                    required: bool) -> Optional[Array]:
  """cuDNN's fused attention via jax.nn.dot_product_attention; None (with a warning) where this
  cuDNN or these shapes are not supported, unless `required`."""
  try:
    return jax.nn.dot_product_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, is_causal=causal, implementation="cudnn")
  except (NotImplementedError, ValueError, RuntimeError) as e:
    if required:
      raise
    logging.warning("attention: cuDNN fused attention unavailable (%s); using XLA's", str(e).splitlines()[0])
    return None


def attention_impl(cfg: TransformerConfig, dropout_active: bool, cached: bool,
                   backend: Optional[str] = None, deterministic_ops: Optional[bool] = None) -> str:
  """'xla' or 'cudnn' for `cfg.attention` (see the module docstring). `deterministic_ops`
  (default: whether nlm_jax.runtime set XLA's flag) rules cuDNN out for 'auto': XLA cannot
  compile cuDNN attention's backward pass under deterministic ops (jax 0.11.2, H200)."""
  if cfg.attention != "auto":
    return cfg.attention
  backend = backend or jax.default_backend()
  deterministic_ops = runtime.deterministic_ops() if deterministic_ops is None else deterministic_ops
  fused_ok = jnp.dtype(cfg.dtype) in (jnp.bfloat16, jnp.float16) and not dropout_active and not cached
  return "cudnn" if backend in ("gpu", "cuda") and fused_ok and not deterministic_ops else "xla"


def _dense(cfg: TransformerConfig, features, axes, std: float, name: str, use_bias=None):
  """x W + b over the last axis of x; `axes` names the kernel's dimensions (input first)."""
  return nn.DenseGeneral(
      features, axis=-1, use_bias=cfg.use_bias if use_bias is None else use_bias,
      dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
      kernel_init=param_init(nn.initializers.normal(std), axes),
      bias_init=param_init(nn.initializers.zeros, axes[1:]),
      name=name)


def _layer_norm(cfg: TransformerConfig, name: str):
  return nn.LayerNorm(  # normalizes and returns in the residual stream's float32 (or float64)
      epsilon=1e-5, use_bias=cfg.use_bias, dtype=cfg.residual_dtype,
      param_dtype=jnp.dtype(cfg.param_dtype),
      scale_init=param_init(nn.initializers.ones, ("norm",)),
      bias_init=param_init(nn.initializers.zeros, ("norm",)), name=name)


class MultiHeadAttention(nn.Module):
  """softmax(Q Kᵀ/√d_k + M) V over H heads, with an optional KV cache.

  `causal=False` drops the mask M (used to test permutation equivariance).
  """

  cfg: TransformerConfig
  causal: bool = True

  @nn.compact
  def __call__(self, x_NxD: Array, batch_size: int, positions_T: Array, cache=None,
               deterministic: bool = True, prefix_B: Optional[Array] = None):
    """x: (N, D) with N = B·T tokens, flattened (XLA's CPU backend runs 2-D matmuls and their
    gradients about twice as fast as 3-D ones); returns (N, D) and the updated layer cache.
    `prefix_B`: a prefix-LM mask — positions < prefix_B[b] of row b also see each other (both
    directions); later positions stay causal."""
    cfg = self.cfg
    B, T = batch_size, positions_T.shape[0]
    std_out = 0.02 / math.sqrt(2 * cfg.n_layers)
    heads = (cfg.n_heads, cfg.d_head)
    q_BxTxHxK = _dense(cfg, heads, ("embed", "heads", "kv"), 0.02, "query")(x_NxD).reshape(B, T, *heads)
    k_BxTxHxK = _dense(cfg, heads, ("embed", "heads", "kv"), 0.02, "key")(x_NxD).reshape(B, T, *heads)
    v_BxTxHxK = _dense(cfg, heads, ("embed", "heads", "kv"), 0.02, "value")(x_NxD).reshape(B, T, *heads)
    if cfg.pos_encoding == "rotary":
      q_BxTxHxK = apply_rotary(q_BxTxHxK, positions_T)
      k_BxTxHxK = apply_rotary(k_BxTxHxK, positions_T)

    rate = cfg.attn_dropout_rate
    dropout_key = None if deterministic or rate == 0.0 else self.make_rng("dropout")
    impl = attention_impl(cfg, dropout_key is not None, cache is not None or prefix_B is not None)
    fused = None
    if cache is None and impl == "cudnn":
      if prefix_B is not None:  # 'auto' never gets here with a prefix (cached=True above)
        raise ValueError("model.attention=cudnn cannot apply a prefix-LM mask (prefix_B): cuDNN's fused "
                         "attention is causal only; use attention=auto or xla")
      fused = cudnn_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, self.causal, required=cfg.attention == "cudnn")
    if fused is not None:
      out_BxTxHxK, new_cache = fused, None
    elif cache is None:
      mask_TxT = jnp.tril(jnp.ones((T, T), bool)) if self.causal else None
      if prefix_B is not None and mask_TxT is not None:
        mask_TxT = _with_prefix(mask_TxT, positions_T, positions_T, prefix_B)
      out_BxTxHxK = dot_product_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, mask_TxT, rate, dropout_key)
      new_cache = None
    else:
      k_cache_BxSxHxK, v_cache_BxSxHxK, index = cache
      zero = jnp.zeros((), index.dtype)  # one index type: Python's 0 is int64 under jax_enable_x64
      start = (zero, index, zero, zero)
      k_cache_BxSxHxK = jax.lax.dynamic_update_slice(k_cache_BxSxHxK, k_BxTxHxK.astype(k_cache_BxSxHxK.dtype), start)
      v_cache_BxSxHxK = jax.lax.dynamic_update_slice(v_cache_BxSxHxK, v_BxTxHxK.astype(v_cache_BxSxHxK.dtype), start)
      S = k_cache_BxSxHxK.shape[1]
      # Query at absolute position index+t sees cached keys s ≤ index+t (the causal mask M).
      mask_TxS = jnp.arange(S)[None, :] <= positions_T[:, None]
      if prefix_B is not None:
        mask_TxS = _with_prefix(mask_TxS, positions_T, jnp.arange(S), prefix_B)
      out_BxTxHxK = dot_product_attention(
          q_BxTxHxK, k_cache_BxSxHxK.astype(q_BxTxHxK.dtype), v_cache_BxSxHxK.astype(q_BxTxHxK.dtype), mask_TxS,
          rate, dropout_key)
      new_cache = (k_cache_BxSxHxK, v_cache_BxSxHxK)

    # W_O: concat over heads, then project back to D.
    y_NxD = nn.DenseGeneral(
        cfg.d_model, axis=(-2, -1), use_bias=cfg.use_bias, dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        kernel_init=param_init(nn.initializers.normal(std_out), ("heads", "kv", "embed")),
        bias_init=param_init(nn.initializers.zeros, ("embed",)), name="out")(out_BxTxHxK.reshape(B * T, *heads))
    return y_NxD, new_cache


def _with_prefix(mask_TxS: Array, positions_T: Array, positions_S: Array, prefix_B: Array) -> Array:
  """The causal mask (T, S) widened per row to a prefix-LM's (B, 1, T, S): query t also sees key s
  when both lie inside the row's prefix."""
  inside_BxT = positions_T[None, :] < prefix_B[:, None]
  inside_BxS = positions_S[None, :] < prefix_B[:, None]
  return (mask_TxS[None] | (inside_BxT[:, :, None] & inside_BxS[:, None, :]))[:, None]


class FeedForward(nn.Module):
  """FFN(x) = GELU(x W₁ + b₁) W₂ + b₂."""

  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x_NxD: Array, deterministic: bool) -> Array:
    cfg = self.cfg
    F = cfg.d_ff or 4 * cfg.d_model
    h_NxF = _dense(cfg, F, ("embed", "mlp"), 0.02, "w1")(x_NxD)
    h_NxF = constrain(nn.gelu(h_NxF), ("batch", "mlp"))
    y_NxD = _dense(cfg, cfg.d_model, ("mlp", "embed"), 0.02 / math.sqrt(2 * cfg.n_layers), "w2")(h_NxF)
    return nn.Dropout(cfg.dropout)(y_NxD, deterministic=deterministic)


class Block(nn.Module):
  """a = h + MHA(LN(h));  h' = a + FFN(LN(a)).  Signature fits `nn.scan`: (h, cache) -> (h', cache')."""

  cfg: TransformerConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, h_NxD: Array, layer_cache, positions_T: Array, index, prefix_B=None):
    cfg = self.cfg
    B = h_NxD.shape[0] // positions_T.shape[0]
    cache = None if layer_cache is None else (*layer_cache, index)
    y_NxD, new_cache = MultiHeadAttention(cfg, name="attn")(_layer_norm(cfg, "ln1")(h_NxD), B,
                                                          positions_T, cache, self.deterministic, prefix_B)
    a_NxD = h_NxD + nn.Dropout(cfg.dropout)(y_NxD, deterministic=self.deterministic).astype(h_NxD.dtype)
    y_NxD = FeedForward(cfg, name="ffn")(_layer_norm(cfg, "ln2")(a_NxD), self.deterministic)
    h_NxD = a_NxD + y_NxD.astype(a_NxD.dtype)
    return constrain(h_NxD, ("batch", "embed_act")), new_cache


class Transformer(nn.Module):
  """Decoder-only Transformer LM: tokens (B, T) int32 → `LMOutput(logits (B,T,V), cache, hidden)`."""

  cfg: TransformerConfig

  def initial_carry(self, batch_size: int) -> KVCache:
    """An empty KV cache of T_max positions (pass `None` instead for a plain causal forward)."""
    cfg = self.cfg
    shape = (batch_size, cfg.context, cfg.n_heads, cfg.d_head)  # K, V in the matmul dtype
    if cfg.scan_layers:
      zeros = jnp.zeros((cfg.n_layers, *shape), jnp.dtype(cfg.dtype))
    else:
      zeros = tuple(jnp.zeros(shape, jnp.dtype(cfg.dtype)) for _ in range(cfg.n_layers))
    return KVCache(zeros, zeros, jnp.zeros((), jnp.int32))

  def __call__(self, tokens_BxT: Array, carry: Optional[KVCache] = None, *,
               deterministic: bool = True, prefix_B: Optional[Array] = None, logits: bool = True) -> LMOutput:
    """`prefix_B` (B,) int: a prefix LM — the first prefix_B[b] positions of row b attend to each
    other in both directions (e.g. a translation's source), the rest causally (None: causal).
    `logits=False`: no output layer (not created by `init` either); `LMOutput.logits` is None."""
    with layers.matmul_precision(self.cfg.matmul_precision):
      return self._forward(tokens_BxT, carry, deterministic, prefix_B, logits)

  @nn.compact
  def _forward(self, tokens_BxT: Array, carry: Optional[KVCache], deterministic: bool,
               prefix_B: Optional[Array] = None, logits: bool = True) -> LMOutput:
    cfg = self.cfg
    T = tokens_BxT.shape[1]
    index = jnp.zeros((), jnp.int32) if carry is None else carry.index
    if carry is not None:  # the cache holds cfg.context positions; past them it would overwrite
      if T > cfg.context or (not isinstance(index, jax.core.Tracer) and int(index) + T > cfg.context):
        raise ValueError(f"KV cache overflow: {T} tokens after {index} cached exceed model.context={cfg.context}")
    elif T > cfg.context and cfg.pos_encoding == "learned":  # the others score past it (positional experiment)
      raise ValueError(f"{T} tokens exceed model.context={cfg.context}, the positions learned")
    if T == 0:
      raise ValueError("a call with 0 tokens (tokens of shape (B, 0))")
    positions_T = index + jnp.arange(T, dtype=jnp.int32)

    embed = layers.Embed(cfg.vocab_size, cfg.d_model, nn.initializers.normal(0.02), method=cfg.embed_method,
                         dtype=cfg.residual_dtype, param_dtype=jnp.dtype(cfg.param_dtype), name="embed")
    h_BxTxD = embed(tokens_BxT)
    if cfg.pos_encoding == "learned":
      P = self.param("pos_embed", param_init(nn.initializers.normal(0.02), ("context", "embed")),
                     (cfg.context, cfg.d_model), jnp.dtype(cfg.param_dtype))
      # Rows index..index+T−1 as one slice: its gradient is a dense update, not a scatter-add.
      P_TxD = jax.lax.dynamic_slice_in_dim(P, index, T, axis=0)
      h_BxTxD = h_BxTxD + P_TxD.astype(h_BxTxD.dtype)[None]
    elif cfg.pos_encoding == "sinusoidal":  # √D·E[w]: P's unit amplitude would swamp E ~ N(0, 0.02²)
      P_TxD = sinusoidal_positions(positions_T, cfg.d_model)
      h_BxTxD = math.sqrt(cfg.d_model) * h_BxTxD + P_TxD.astype(h_BxTxD.dtype)[None]
    self.sow("intermediates", "h0", h_BxTxD)  # h⁰, for inspection (a no-op unless asked for)
    h_BxTxD = nn.Dropout(cfg.dropout)(h_BxTxD, deterministic=deterministic)
    B = tokens_BxT.shape[0]
    h_NxD = constrain(h_BxTxD.reshape(B * T, cfg.d_model), ("batch", "embed_act"))  # N = B·T

    block = nn.remat(Block, static_argnums=()) if cfg.remat else Block
    kv = None if carry is None else (carry.k, carry.v)
    if cfg.scan_layers:
      layers_fn = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.n_layers,
                          metadata_params={nn.PARTITION_NAME: "layers"})
      h_NxD, new_kv = layers_fn(cfg, deterministic, name="blocks")(h_NxD, kv, positions_T, index, prefix_B)
    else:
      new_k, new_v = [], []
      for l in range(cfg.n_layers):
        layer_kv = None if kv is None else (kv[0][l], kv[1][l])
        h_NxD, layer_kv = block(cfg, deterministic, name=f"block_{l}")(h_NxD, layer_kv, positions_T, index,
                                                                        prefix_B)
        if layer_kv is not None:
          new_k.append(layer_kv[0])
          new_v.append(layer_kv[1])
      new_kv = None if kv is None else (tuple(new_k), tuple(new_v))

    h_NxD = _layer_norm(cfg, "ln_f")(h_NxD)
    new_carry = None if carry is None else KVCache(new_kv[0], new_kv[1], index + T)
    if carry is not None and isinstance(index, jax.core.Tracer):  # traced: an overflow makes NaN, not a wrong number
      h_NxD = jnp.where(index + T <= cfg.context, h_NxD, jnp.nan)
    if not logits:
      return LMOutput(None, new_carry, h_NxD.reshape(B, T, cfg.d_model))
    if cfg.tie_embeddings:  # in the matmul dtype, accumulated and returned in float32
      logits_NxV = embed.attend(h_NxD, compute_dtype=cfg.dtype)
    else:
      logits_NxV = _dense(cfg, cfg.vocab_size, ("embed", "vocab"), 0.02, "out", use_bias=False)(h_NxD)
      logits_NxV = logits_NxV.astype(cfg.residual_dtype)
    logits_BxTxV = constrain(logits_NxV.reshape(B, T, -1), ("batch", "length", "vocab"))
    h_BxTxD = h_NxD.reshape(B, T, cfg.d_model)
    return LMOutput(logits_BxTxV, new_carry, h_BxTxD)
