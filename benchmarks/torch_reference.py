r"""PyTorch reference implementations of the nlm_jax models, for throughput comparisons.

Each torch module below is built from the same config dataclass as its nlm_jax counterpart and
has the same parameters (same shapes, same count, same initial distributions), so a timing
difference is a framework difference, not a model difference:

    TorchTransformer  nanoGPT's model.py (karpathy/nanoGPT): pre-LN blocks, causal attention via
                      F.scaled_dot_product_attention, GELU MLP, learned positions, tied embeddings.
                      Q, K, V are separate Linear layers like nlm_jax's `query`/`key`/`value`
                      (`fused_qkv=True` gives nanoGPT's single `c_attn`; same count either way).
    TorchRecurrentLM  PyTorch's examples/word_language_model: Embedding → nn.RNN / nn.LSTM
                      (batch_first, dropout between layers) → dropout → Linear (tied optionally).
    TorchFNN          Bengio's NPLM exactly as nlm_jax/models/fnn.py: y = b + W x + U tanh(d + H x).

Differences from the upstream PyTorch code, all to match nlm_jax:
  * RNN/LSTM: torch keeps two bias vectors per layer (b_ih, b_hh) where the math has one b.
    We build the module with bias=True and re-register every b_hh as a zero, non-trainable
    *buffer* of the same name. `nn.RNNBase` gathers its weights by attribute name
    (`_flat_weights_names`), so the forward makes the same `_VF.lstm`/`_VF.rnn_tanh` call with
    has_biases=True as a stock module (on CPU: oneDNN's `mkldnn_rnn_layer` for the LSTM, a
    per-step matmul loop for the Elman RNN, as stock); only the parameter list changes.
    (bias=False would drop b_ih too; adding b by hand outside the call would cost an extra pass.)
  * Transformer: GELU defaults to the tanh approximation (flax's `nn.gelu`); nanoGPT uses the exact
    erf form, which `run_nanogpt_shakespeare_char` uses. Dropout sits where both nanoGPT and
    nlm_jax have it: embeddings, attention probabilities (SDPA's dropout_p), attention output,
    FFN output.
  * LSTM forget-gate bias starts at cfg.forget_bias, as in nlm_jax.

`load_jax_params` copies an nlm_jax parameter tree into the torch module (logits then agree to
~1e-7). Timing helpers: `time_torch_training` (training tokens/s), `torch_generate_ms_per_token`
(greedy decoding), and `run_nanogpt_shakespeare_char` (nanoGPT's whole recipe: its CPU one by
default; on a GPU as nanoGPT runs there with device='cuda', compile=True, dtype='bfloat16').
On a 2-core machine, time only when nothing else runs: with 2 OpenMP threads, another process
taking half the CPU slows torch steps 5-10×, not 2× (`TrainTiming.cpu_seconds` shows it).
Run `python -m benchmarks.torch_reference` for the checks and timings of the default shapes.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from nlm_jax.models import FNNConfig, LSTMConfig, RNNConfig, TransformerConfig

Tensor = torch.Tensor
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "float64": torch.float64}


# ============================================================================ Transformer


def _rotate(x_BxHxTxK: Tensor, positions_T: Tensor) -> Tensor:
  """Rotary encoding as nlm_jax's `apply_rotary`: pairs (x_{2i}, x_{2i+1}) turned by t·θ_i."""
  d_k = x_BxHxTxK.shape[-1]
  theta = 1.0 / (10000.0 ** (torch.arange(0, d_k, 2, dtype=torch.float32) / d_k))
  angle_TxK2 = positions_T.float()[:, None] * theta[None, :]
  cos, sin = torch.cos(angle_TxK2), torch.sin(angle_TxK2)
  x1, x2 = x_BxHxTxK[..., 0::2], x_BxHxTxK[..., 1::2]
  return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).to(x_BxHxTxK.dtype)


def _sinusoidal(positions_T: Tensor, d_model: int) -> Tensor:
  inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d_model, 2, dtype=torch.float32) / d_model))
  angle_TxD2 = positions_T.float()[:, None] * inv_freq[None, :]
  P_TxD = torch.zeros(positions_T.shape[0], d_model)
  P_TxD[:, 0::2] = torch.sin(angle_TxD2)
  P_TxD[:, 1::2] = torch.cos(angle_TxD2[:, : d_model // 2])
  return P_TxD


class CausalSelfAttention(nn.Module):
  """softmax(Q Kᵀ/√d_k + M) V over H heads; `cache` = (k_BxHxSxK, v_BxHxSxK) preallocated."""

  def __init__(self, cfg: TransformerConfig, fused_qkv: bool):
    super().__init__()
    D, bias = cfg.d_model, cfg.use_bias
    self.cfg, self.fused_qkv = cfg, fused_qkv
    if fused_qkv:
      self.c_attn = nn.Linear(D, 3 * D, bias=bias)
    else:
      self.query, self.key, self.value = (nn.Linear(D, D, bias=bias) for _ in range(3))
    self.out = nn.Linear(D, D, bias=bias)
    self.resid_dropout = nn.Dropout(cfg.dropout)
    self.attn_dropout = cfg.dropout if cfg.attn_dropout is None else cfg.attn_dropout

  def forward(self, x_BxTxD: Tensor, positions_T: Tensor, cache=None, index: int = 0) -> Tensor:
    B, T, D = x_BxTxD.shape
    H, K = self.cfg.n_heads, self.cfg.d_head
    if self.fused_qkv:
      q, k, v = self.c_attn(x_BxTxD).split(D, dim=2)
    else:
      q, k, v = self.query(x_BxTxD), self.key(x_BxTxD), self.value(x_BxTxD)
    q_BxHxTxK, k_BxHxTxK, v_BxHxTxK = (z.view(B, T, H, K).transpose(1, 2) for z in (q, k, v))
    if self.cfg.pos_encoding == "rotary":
      q_BxHxTxK, k_BxHxTxK = _rotate(q_BxHxTxK, positions_T), _rotate(k_BxHxTxK, positions_T)
    if cache is None:
      y_BxHxTxK = F.scaled_dot_product_attention(q_BxHxTxK, k_BxHxTxK, v_BxHxTxK, is_causal=True,
                                                 dropout_p=self.attn_dropout if self.training else 0.0)
    else:
      k_cache, v_cache = cache
      k_cache[:, :, index:index + T] = k_BxHxTxK
      v_cache[:, :, index:index + T] = v_BxHxTxK
      S = index + T
      if T == 1:  # one new query sees every cached position
        mask = None
      else:  # query at index+t sees s ≤ index+t
        mask = torch.arange(S, device=positions_T.device)[None, :] <= positions_T[:, None]
      y_BxHxTxK = F.scaled_dot_product_attention(q_BxHxTxK, k_cache[:, :, :S], v_cache[:, :, :S],
                                                 attn_mask=mask)
    y_BxTxD = y_BxHxTxK.transpose(1, 2).contiguous().view(B, T, D)
    return self.resid_dropout(self.out(y_BxTxD))


class MLP(nn.Module):
  """FFN(x) = GELU(x W₁ + b₁) W₂ + b₂."""

  def __init__(self, cfg: TransformerConfig, gelu_approximate: str):
    super().__init__()
    F_ = cfg.d_ff or 4 * cfg.d_model
    self.w1 = nn.Linear(cfg.d_model, F_, bias=cfg.use_bias)
    self.gelu = nn.GELU(approximate=gelu_approximate)
    self.w2 = nn.Linear(F_, cfg.d_model, bias=cfg.use_bias)
    self.dropout = nn.Dropout(cfg.dropout)

  def forward(self, x_BxTxD: Tensor) -> Tensor:
    return self.dropout(self.w2(self.gelu(self.w1(x_BxTxD))))


class Block(nn.Module):
  """a = h + MHA(LN(h));  h' = a + FFN(LN(a))."""

  def __init__(self, cfg: TransformerConfig, fused_qkv: bool, gelu_approximate: str):
    super().__init__()
    self.ln1 = nn.LayerNorm(cfg.d_model, eps=1e-5, bias=cfg.use_bias)
    self.attn = CausalSelfAttention(cfg, fused_qkv)
    self.ln2 = nn.LayerNorm(cfg.d_model, eps=1e-5, bias=cfg.use_bias)
    self.mlp = MLP(cfg, gelu_approximate)

  def forward(self, h_BxTxD: Tensor, positions_T: Tensor, cache=None, index: int = 0) -> Tensor:
    a_BxTxD = h_BxTxD + self.attn(self.ln1(h_BxTxD), positions_T, cache, index)
    return a_BxTxD + self.mlp(self.ln2(a_BxTxD))


class TorchTransformer(nn.Module):
  """nanoGPT's GPT with nlm_jax's TransformerConfig. forward(tokens (B,T), cache, index) → logits."""

  def __init__(self, cfg: TransformerConfig, fused_qkv: bool = False, gelu_approximate: str = "tanh"):
    super().__init__()
    self.cfg = cfg
    D = cfg.d_model
    self.embed = nn.Embedding(cfg.vocab_size, D)
    if cfg.pos_encoding == "learned":
      self.pos_embed = nn.Parameter(torch.empty(cfg.context, D))
    self.drop = nn.Dropout(cfg.dropout)
    self.blocks = nn.ModuleList(Block(cfg, fused_qkv, gelu_approximate) for _ in range(cfg.n_layers))
    self.ln_f = nn.LayerNorm(D, eps=1e-5, bias=cfg.use_bias)
    self.lm_head = nn.Linear(D, cfg.vocab_size, bias=False)
    if cfg.tie_embeddings:
      self.lm_head.weight = self.embed.weight
    # nanoGPT's init: N(0, 0.02) weights and positions, zero biases, N(0, 0.02/√(2L)) on the
    # projections that write into the residual stream (nlm_jax's `out` and `w2`).
    for module in self.modules():
      if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, 0.0, 0.02)
      if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    for block in self.blocks:
      for residual in (block.attn.out, block.mlp.w2):
        nn.init.normal_(residual.weight, 0.0, 0.02 / math.sqrt(2 * cfg.n_layers))
    if cfg.pos_encoding == "learned":
      nn.init.normal_(self.pos_embed, 0.0, 0.02)
    self.to(_DTYPES[cfg.param_dtype])

  def empty_cache(self, batch_size: int) -> list:
    """Per-layer (k, v) buffers of T_max = context positions."""
    cfg = self.cfg
    shape = (batch_size, cfg.n_heads, cfg.context, cfg.d_head)
    dtype = self.embed.weight.dtype
    return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in self.blocks]

  def forward(self, tokens_BxT: Tensor, cache: Optional[list] = None, index: int = 0,
              last_only: bool = False) -> Tensor:
    T = tokens_BxT.shape[1]
    if index + T > self.cfg.context and self.cfg.pos_encoding == "learned":
      raise ValueError(f"sequence of {index + T} tokens exceeds context={self.cfg.context}")
    positions_T = torch.arange(index, index + T, device=tokens_BxT.device)
    h_BxTxD = self.embed(tokens_BxT)
    if self.cfg.pos_encoding == "learned":
      h_BxTxD = h_BxTxD + self.pos_embed[index:index + T]
    elif self.cfg.pos_encoding == "sinusoidal":
      h_BxTxD = h_BxTxD + _sinusoidal(positions_T, self.cfg.d_model).to(h_BxTxD.dtype)
    h_BxTxD = self.drop(h_BxTxD)
    for l, block in enumerate(self.blocks):
      h_BxTxD = block(h_BxTxD, positions_T, None if cache is None else cache[l], index)
    h_BxTxD = self.ln_f(h_BxTxD)
    if last_only:  # nanoGPT's inference shortcut: the output layer on the last position only
      h_BxTxD = h_BxTxD[:, -1:]
    return self.lm_head(h_BxTxD)


# ============================================================================ RNN / LSTM


def _drop_hidden_biases(rnn: nn.RNNBase) -> None:
  """Turns every b_hh of a torch RNN/LSTM into a zero non-trainable buffer (see module docstring)."""
  for name in list(rnn._flat_weights_names):
    if name.startswith("bias_hh"):
      p = getattr(rnn, name)
      del rnn._parameters[name]
      rnn.register_buffer(name, torch.zeros_like(p, requires_grad=False))
  rnn._init_flat_weights()  # re-reads the weights by name: the buffers now stand in for b_hh


class TorchRecurrentLM(nn.Module):
  """word_language_model's RNNModel: forward(tokens (B,T), hidden) → (logits (B,T,V), hidden)."""

  def __init__(self, cfg: RNNConfig | LSTMConfig):
    super().__init__()
    self.cfg = cfg
    self.drop = nn.Dropout(cfg.dropout)
    self.encoder = nn.Embedding(cfg.vocab_size, cfg.d_embed)
    kwargs = dict(num_layers=cfg.n_layers, dropout=cfg.dropout if cfg.n_layers > 1 else 0.0,
                  batch_first=True, bias=True)
    if isinstance(cfg, LSTMConfig):
      self.rnn = nn.LSTM(cfg.d_embed, cfg.d_hidden, **kwargs)
    else:
      self.rnn = nn.RNN(cfg.d_embed, cfg.d_hidden, nonlinearity=cfg.activation, **kwargs)
    _drop_hidden_biases(self.rnn)
    self.decoder = nn.Linear(cfg.d_hidden, cfg.vocab_size)
    if cfg.tie_embeddings:
      self.decoder.weight = self.encoder.weight
    # Initial distributions as in nlm_jax: U(±0.1) embedding/output, U(±1/√H) recurrent weights
    # (torch's default, kept), zero biases except the LSTM forget gate.
    nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
    if not cfg.tie_embeddings:
      nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
    nn.init.zeros_(self.decoder.bias)
    H = cfg.d_hidden
    with torch.no_grad():
      for l in range(cfg.n_layers):
        b = getattr(self.rnn, f"bias_ih_l{l}")
        b.zero_()
        if isinstance(cfg, LSTMConfig):
          b[H:2 * H] = cfg.forget_bias  # torch's gate order is (i, f, g, o), like nlm_jax
    self.to(_DTYPES[cfg.param_dtype])

  def initial_carry(self, batch_size: int):
    dtype = self.encoder.weight.dtype
    h = torch.zeros(self.cfg.n_layers, batch_size, self.cfg.d_hidden, dtype=dtype)
    return (h, h.clone()) if isinstance(self.cfg, LSTMConfig) else h

  def forward(self, tokens_BxT: Tensor, hidden=None):
    if hidden is None:
      hidden = self.initial_carry(tokens_BxT.shape[0])
    h_BxTxH, hidden = self.rnn(self.drop(self.encoder(tokens_BxT)), hidden)
    return self.decoder(self.drop(h_BxTxH)), hidden


# ============================================================================ FNN


class TorchFNN(nn.Module):
  """Bengio NPLM: forward(tokens (B,T), window (B,n−1)) → (logits (B,T,V), window)."""

  def __init__(self, cfg: FNNConfig):
    super().__init__()
    self.cfg = cfg
    n, V, m, h = cfg.context, cfg.vocab_size, cfg.d_embed, cfg.d_hidden
    self.C = nn.Embedding(V, m)
    self.H = nn.Linear((n - 1) * m, h)  # d + H x
    self.U = nn.Linear(h, V)  # b + U a
    self.W = nn.Linear((n - 1) * m, V, bias=False) if cfg.direct else None  # W x
    self.drop = nn.Dropout(cfg.dropout)
    nn.init.normal_(self.C.weight, 0.0, 1.0)
    for lin in (self.H, self.U):  # glorot_uniform kernels, zero biases, as nlm_jax
      nn.init.xavier_uniform_(lin.weight)
      nn.init.zeros_(lin.bias)
    if self.W is not None:
      nn.init.zeros_(self.W.weight)
    self.to(_DTYPES[cfg.param_dtype])

  def initial_carry(self, batch_size: int) -> Tensor:
    return torch.full((batch_size, self.cfg.context - 1), self.cfg.bos_id, dtype=torch.long)

  def forward(self, tokens_BxT: Tensor, window_BxN1: Optional[Tensor] = None):
    B, T = tokens_BxT.shape
    n = self.cfg.context
    if window_BxN1 is None:
      window_BxN1 = self.initial_carry(B)
    w_BxS = torch.cat([window_BxN1.to(tokens_BxT.dtype), tokens_BxT], dim=1)
    e_BxSxM = self.C(w_BxS)
    # x_t = (C[w_{t−n+2}], ..., C[w_t]): token t sits at index t + n−1 of w_BxS (the window first).
    x_BxTxNM = torch.cat([e_BxSxM[:, j + 1:j + 1 + T] for j in range(n - 1)], dim=-1)
    y_BxTxV = self.U(self.drop(torch.tanh(self.H(x_BxTxNM))))
    if self.W is not None:
      y_BxTxV = y_BxTxV + self.W(x_BxTxNM)
    return y_BxTxV, w_BxS[:, -(n - 1):]


# ============================================================================ building, counting


def build_torch(cfg, **kwargs) -> nn.Module:
  """The torch module for an nlm_jax config; kwargs go to TorchTransformer only."""
  if isinstance(cfg, TransformerConfig):
    return TorchTransformer(cfg, **kwargs)
  if isinstance(cfg, (RNNConfig, LSTMConfig)):
    return TorchRecurrentLM(cfg)
  if isinstance(cfg, FNNConfig):
    return TorchFNN(cfg)
  raise ValueError(f"no torch reference for config {type(cfg).__name__}")


def count_params(module: nn.Module) -> int:
  """Trainable parameters, each tied tensor counted once (buffers such as the zero b_hh excluded)."""
  return sum(p.numel() for p in module.parameters() if p.requires_grad)


def jax_param_count(params: Any) -> int:
  """sum(x.size for x in jax.tree.leaves(params)); accepts `variables` or `variables['params']`."""
  import jax  # the torch side works without jax; only the comparison needs it
  if isinstance(params, dict) and "params" in params:
    params = params["params"]
  return sum(x.size for x in jax.tree.leaves(params))


def assert_same_param_count(torch_module: nn.Module, jax_params: Any) -> int:
  """Raises AssertionError unless both models have the same number of parameters; returns it."""
  n_torch, n_jax = count_params(torch_module), jax_param_count(jax_params)
  assert n_torch == n_jax, (f"{type(torch_module).__name__} has {n_torch:,} parameters, "
                            f"the nlm_jax model {n_jax:,} (difference {n_torch - n_jax:+,})")
  return n_torch


def load_jax_params(module: nn.Module, params: Any) -> nn.Module:
  """Copies nlm_jax parameters into the matching torch module (for output-equality checks)."""
  import numpy as np
  from flax.core import meta
  if isinstance(params, dict) and "params" in params:
    params = params["params"]
  p = meta.unbox(params)

  def put(dst: Tensor, value) -> None:
    value = torch.from_numpy(np.array(value, dtype=np.float32)).to(dst.dtype)  # a writable copy
    assert dst.shape == value.shape, (dst.shape, value.shape)
    with torch.no_grad():
      dst.copy_(value)

  cfg = module.cfg
  if isinstance(module, TorchTransformer):
    if cfg.scan_layers:
      raise ValueError("load_jax_params: scan_layers=True params are stacked; use scan_layers=False")
    D = cfg.d_model
    put(module.embed.weight, p["embed"]["embedding"])
    if cfg.pos_encoding == "learned":
      put(module.pos_embed, p["pos_embed"])
    if not cfg.tie_embeddings:
      put(module.lm_head.weight, p["out"]["kernel"].T)
    for l, blk in enumerate(module.blocks):
      jb = p[f"block_{l}"]
      for tln, jln in ((blk.ln1, "ln1"), (blk.ln2, "ln2")):
        put(tln.weight, jb[jln]["scale"])
        if cfg.use_bias:
          put(tln.bias, jb[jln]["bias"])
      qkv = [jb["attn"][n] for n in ("query", "key", "value")]
      kernels = [x["kernel"].reshape(D, D).T for x in qkv]
      biases = [x["bias"].reshape(D) for x in qkv] if cfg.use_bias else None
      if blk.attn.fused_qkv:
        put(blk.attn.c_attn.weight, np.concatenate(kernels, 0))
        if biases:
          put(blk.attn.c_attn.bias, np.concatenate(biases, 0))
      else:
        for i, lin in enumerate((blk.attn.query, blk.attn.key, blk.attn.value)):
          put(lin.weight, kernels[i])
          if biases:
            put(lin.bias, biases[i])
      # out: (H, K, D) → (D_out, H·K); w1, w2: (in, out) → (out, in).
      for tl, jl in ((blk.attn.out, jb["attn"]["out"]), (blk.mlp.w1, jb["ffn"]["w1"]), (blk.mlp.w2, jb["ffn"]["w2"])):
        put(tl.weight, jl["kernel"].reshape(-1, jl["kernel"].shape[-1]).T)
        if cfg.use_bias:
          put(tl.bias, jl["bias"])
    put(module.ln_f.weight, p["ln_f"]["scale"])
    if cfg.use_bias:
      put(module.ln_f.bias, p["ln_f"]["bias"])
  elif isinstance(module, TorchRecurrentLM):
    put(module.encoder.weight, p["embed"]["embedding"])
    if cfg.tie_embeddings:
      put(module.decoder.bias, p["out_bias"])
    else:
      put(module.decoder.weight, p["out"]["kernel"].T)
      put(module.decoder.bias, p["out"]["bias"])
    for l in range(cfg.n_layers):
      jl = p[f"layer_{l}"]
      H = cfg.d_hidden
      put(getattr(module.rnn, f"weight_ih_l{l}"), jl["W"].reshape(jl["W"].shape[0], -1).T)
      put(getattr(module.rnn, f"weight_hh_l{l}"), jl["U"].reshape(H, -1).T)
      put(getattr(module.rnn, f"bias_ih_l{l}"), jl["b"].reshape(-1))
  elif isinstance(module, TorchFNN):
    put(module.C.weight, p["C"]["embedding"])
    put(module.H.weight, p["H"]["kernel"].T)
    put(module.H.bias, p["H"]["bias"])
    put(module.U.weight, p["U"]["kernel"].T)
    put(module.U.bias, p["U"]["bias"])
    if module.W is not None:
      put(module.W.weight, p["W"]["kernel"].T)
  return module


# ============================================================================ training step


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.999), momentum: float = 0.0
                   ) -> torch.optim.Optimizer:
  """AdamW with nanoGPT's grouping (weight decay on ≥2-D tensors only) or SGD."""
  params = [p for p in model.parameters() if p.requires_grad]
  if name == "adamw":
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in params)  # nanoGPT uses the fused CUDA kernel where it can
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **({"fused": True} if fused else {}))
  if name == "sgd":
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
  raise ValueError(f"unknown optimizer {name!r}; allowed: adamw, sgd")


def _detach(carry):
  """word_language_model's repackage_hidden: cut the graph, keep the values (truncated BPTT)."""
  if carry is None or isinstance(carry, Tensor):
    return None if carry is None else carry.detach()
  return tuple(_detach(c) for c in carry)


class TorchTrainStep:
  """step(inputs (B,T) int64, targets (B,T) int64) → mean next-token cross-entropy (a 0-d tensor).

  RNN/LSTM hidden states and the FNN window are carried from one call to the next, detached.
  """

  def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float = 0.0,
               autocast: Optional[torch.dtype] = None, forward: Optional[Any] = None):
    self.model, self.optimizer, self.grad_clip = model, optimizer, grad_clip
    self.carries = not isinstance(model, TorchTransformer)
    self.carry = None
    self.forward = model if forward is None else forward  # e.g. torch.compile(model) (no truth value)
    device = next(model.parameters()).device.type
    self.autocast = (lambda: torch.autocast(device, dtype=autocast)) if autocast else contextlib.nullcontext

  def reset(self) -> None:
    self.carry = None

  def __call__(self, inputs_BxT: Tensor, targets_BxT: Tensor) -> Tensor:
    self.model.train()
    with self.autocast():
      if self.carries:
        logits_BxTxV, carry = self.forward(inputs_BxT, self.carry)
        self.carry = _detach(carry)
      else:
        logits_BxTxV = self.forward(inputs_BxT)
      loss = F.cross_entropy(logits_BxTxV.reshape(-1, logits_BxTxV.shape[-1]).float(),
                             targets_BxT.reshape(-1))
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if self.grad_clip > 0.0:
      nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
    self.optimizer.step()
    return loss.detach()


def torch_train_step_fn(model: nn.Module, optimizer_name: str = "adamw", lr: float = 1e-3,
                        weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                        momentum: float = 0.0, grad_clip: float = 0.0, autocast: Optional[torch.dtype] = None,
                        compile: bool = False) -> TorchTrainStep:
  """A training step for `model`: forward, mean cross-entropy, backward, clip (if grad_clip > 0),
  optimizer step. The optimizer is `step.optimizer` (set its lr for schedules). `autocast`
  (e.g. torch.bfloat16) runs the forward under torch.autocast; `compile` under torch.compile."""
  return TorchTrainStep(model, make_optimizer(model, optimizer_name, lr, weight_decay, betas, momentum),
                        grad_clip, autocast, torch.compile(model) if compile else None)


# ============================================================================ timing


class TrainTiming(NamedTuple):
  """seconds: wall time of each repeat (each `steps` steps); tokens: tokens per repeat;
  cpu_seconds: this process's CPU time in each repeat. cpu_seconds/seconds well below the thread
  count means the cores were shared with other work during that repeat."""

  seconds: list[float]
  tokens: int
  cpu_seconds: list[float]

  @property
  def tokens_per_s(self) -> list[float]:
    return [self.tokens / s for s in self.seconds]


def _random_batches(vocab_size: int, batch_size: int, seq_len: int, n: int, seed: int):
  g = torch.Generator().manual_seed(seed)
  tokens = torch.randint(vocab_size, (n, batch_size, seq_len + 1), generator=g)
  return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]


def time_torch_training(cfg, batch_size: int, seq_len: int, optimizer: str = "adamw", steps: int = 50,
                        warmup: int = 5, repeats: int = 5, grad_clip: float = 0.0, lr: float = 1e-3,
                        num_threads: int = 2, seed: int = 0, **model_kwargs) -> TrainTiming:
  """Training throughput of the torch reference for `cfg` on random tokens (B, T).

  Sets torch.set_num_threads(num_threads) (a process-wide setting). Returns the seconds of each
  repeat; tokens/s = B·T·steps / seconds (`.tokens_per_s`); take the median yourself.
  """
  torch.set_num_threads(num_threads)
  torch.manual_seed(seed)
  model = build_torch(cfg, **model_kwargs)
  step = torch_train_step_fn(model, optimizer, lr=lr, grad_clip=grad_clip)
  batches = _random_batches(cfg.vocab_size, batch_size, seq_len, 16, seed)
  for i in range(warmup):
    step(*batches[i % len(batches)])
  seconds, cpu_seconds = [], []
  for _ in range(repeats):
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(steps):
      loss = step(*batches[i % len(batches)])
    loss.item()
    seconds.append(time.perf_counter() - t0)
    cpu_seconds.append(time.process_time() - c0)
  return TrainTiming(seconds, batch_size * seq_len * steps, cpu_seconds)


@torch.no_grad()
def torch_generate_ms_per_token(cfg, new_tokens: int = 256, batch_size: int = 1, prompt_len: int = 1,
                                kv_cache: bool = False, repeats: int = 3, warmup_tokens: int = 8,
                                num_threads: int = 2, seed: int = 0, **model_kwargs) -> list[float]:
  """Greedy decoding time in ms per new token (one list entry per repeat).

  Transformer: by default nanoGPT's `generate` — the whole (cropped to `context`) sequence is
  re-run for every new token, output layer on the last position only. `kv_cache=True` prefills
  the prompt once and then feeds one token at a time; it needs prompt_len + new_tokens ≤ context.
  RNN/LSTM/FNN: one token per call with the carried state (hidden state or n−1 window).
  """
  torch.set_num_threads(num_threads)
  torch.manual_seed(seed)
  model = build_torch(cfg, **model_kwargs).eval()
  prompt_BxP = torch.randint(cfg.vocab_size, (batch_size, prompt_len))
  is_transformer = isinstance(model, TorchTransformer)
  if kv_cache and not is_transformer:
    raise ValueError("kv_cache applies to the Transformer only")
  if kv_cache and prompt_len + new_tokens > cfg.context:
    raise ValueError(f"kv_cache decoding of {prompt_len}+{new_tokens} tokens needs "
                     f"context ≥ {prompt_len + new_tokens} (got {cfg.context})")

  def decode(n: int) -> Tensor:
    if is_transformer and not kv_cache:
      idx_BxS = prompt_BxP
      for _ in range(n):
        logits = model(idx_BxS[:, -cfg.context:], last_only=True)
        idx_BxS = torch.cat([idx_BxS, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
      return idx_BxS
    if is_transformer:
      cache = model.empty_cache(batch_size)
      logits = model(prompt_BxP, cache, 0, last_only=True)
      out = [prompt_BxP]
      for i in range(n):
        tok_Bx1 = logits[:, -1].argmax(-1, keepdim=True)
        out.append(tok_Bx1)
        if i < n - 1:  # the last token needs no forward pass
          logits = model(tok_Bx1, cache, prompt_len + i)
      return torch.cat(out, dim=1)
    logits, carry = model(prompt_BxP)
    out = [prompt_BxP]
    for _ in range(n):
      tok_Bx1 = logits[:, -1].argmax(-1, keepdim=True)
      out.append(tok_Bx1)
      logits, carry = model(tok_Bx1, carry)
    return torch.cat(out, dim=1)

  decode(min(warmup_tokens, new_tokens))
  ms = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    decode(new_tokens)
    ms.append(1000.0 * (time.perf_counter() - t0) / new_tokens)
  return ms


# ============================================================================ nanoGPT recipe


def run_nanogpt_shakespeare_char(text_path: str, iters: int = 2000, batch_size: int = 12,
                                 block_size: int = 64, n_layer: int = 4, n_head: int = 4, n_embd: int = 128,
                                 lr: float = 1e-3, min_lr: float = 1e-4, warmup_iters: int = 100,
                                 lr_decay_iters: Optional[int] = None, weight_decay: float = 0.1,
                                 betas: tuple[float, float] = (0.9, 0.99), grad_clip: float = 1.0,
                                 eval_interval: int = 250, eval_iters: int = 20, dropout: float = 0.0,
                                 fused_qkv: bool = True, gelu_approximate: str = "none",
                                 num_threads: int = 2, seed: int = 1337, log: bool = True,
                                 device: str = "cpu", compile: bool = False, dtype: str = "float32") -> dict:
  """nanoGPT's CPU shakespeare_char recipe (README: `train.py config/train_shakespeare_char.py
  --device=cpu --compile=False --eval_iters=20 --block_size=64 --batch_size=12 --n_layer=4
  --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0`), loop as in train.py:
  evaluate at every `eval_interval` (iteration 0 and the last included), iterations 0..iters.

  On a GPU, nanoGPT's defaults there: device='cuda', compile=True (torch.compile), dtype='bfloat16'
  (autocast; TF32 allowed for float32 matmuls), fused AdamW, pinned non-blocking batch copies.

  Returns {'wall_s', 'train_s' (wall time less evaluation), 'val_loss', 'train_loss' (last
  evaluation), 'best_val_loss', 'history' [(iter, train, val)], 'params', 'iters'}.
  """
  torch.set_num_threads(num_threads)
  torch.manual_seed(seed)
  cuda = device.startswith("cuda")
  if cuda:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
  autocast = _DTYPES[dtype] if dtype != "float32" else None
  ctx = (lambda: torch.autocast(device.split(":")[0], dtype=autocast)) if autocast else contextlib.nullcontext
  lr_decay_iters = iters if lr_decay_iters is None else lr_decay_iters
  with open(text_path, encoding="utf-8") as f:
    text = f.read()
  chars = sorted(set(text))
  stoi = {c: i for i, c in enumerate(chars)}
  data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
  n = int(0.9 * len(data))
  splits = {"train": data[:n], "val": data[n:]}

  def get_batch(split: str):
    d = splits[split]
    ix = torch.randint(len(d) - block_size, (batch_size,))
    x = torch.stack([d[i:i + block_size] for i in ix])
    y = torch.stack([d[i + 1:i + 1 + block_size] for i in ix])
    if cuda:
      return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y

  cfg = TransformerConfig(vocab_size=len(chars), d_model=n_embd, n_heads=n_head, n_layers=n_layer,
                          context=block_size, pos_encoding="learned", dropout=dropout,
                          tie_embeddings=True, use_bias=False)
  model = TorchTransformer(cfg, fused_qkv=fused_qkv, gelu_approximate=gelu_approximate).to(device)
  step = torch_train_step_fn(model, "adamw", lr=lr, weight_decay=weight_decay, betas=betas,
                             grad_clip=grad_clip, autocast=autocast, compile=compile)

  def get_lr(it: int) -> float:  # nanoGPT's: linear warmup, cosine decay to min_lr
    if it < warmup_iters:
      return lr * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
      return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

  @torch.no_grad()
  def estimate_loss() -> dict:
    model.eval()
    out = {}
    for split in ("train", "val"):
      losses = torch.zeros(eval_iters)
      for k in range(eval_iters):
        x, y = get_batch(split)
        with ctx():
          logits = step.forward(x)
          losses[k] = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.view(-1)).item()
      out[split] = losses.mean().item()
    model.train()
    return out

  history, eval_s = [], 0.0
  x, y = get_batch("train")
  t_start = time.perf_counter()
  for it in range(iters + 1):
    for group in step.optimizer.param_groups:
      group["lr"] = get_lr(it)
    if it % eval_interval == 0 or it == iters:
      t0 = time.perf_counter()
      losses = estimate_loss()
      eval_s += time.perf_counter() - t0
      history.append((it, losses["train"], losses["val"]))
      if log:
        print(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
              f"{time.perf_counter() - t_start:.1f} s", flush=True)
    step(x, y)
    x, y = get_batch("train")
  wall_s = time.perf_counter() - t_start
  _, train_loss, val_loss = history[-1]
  return {"wall_s": wall_s, "train_s": wall_s - eval_s, "val_loss": val_loss, "train_loss": train_loss,
          "best_val_loss": min(h[2] for h in history), "history": history, "params": count_params(model),
          "iters": iters}


# ============================================================================ checks and timings


BENCHMARK_CONFIGS = {  # name: (config, batch_size, seq_len)
    "transformer": (TransformerConfig(vocab_size=65, d_model=128, n_heads=4, n_layers=4, context=64,
                                      use_bias=False), 12, 64),
    "lstm": (LSTMConfig(vocab_size=33278, d_embed=200, d_hidden=200, n_layers=2, dropout=0.2), 20, 35),
    "rnn": (RNNConfig(vocab_size=33278, d_embed=200, d_hidden=200, n_layers=2, dropout=0.2), 20, 35),
    "fnn": (FNNConfig(vocab_size=33278, context=5, d_embed=200, d_hidden=200), 20, 35),
}


def main() -> None:
  import argparse
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"))
  parser.add_argument("--nanogpt", metavar="TEXT", help="also run the nanoGPT recipe on this text file")
  args = parser.parse_args()

  import statistics

  import jax
  import jax.numpy as jnp
  from nlm_jax.models import build

  for name, (cfg, B, T) in BENCHMARK_CONFIGS.items():
    variables = build(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    n = assert_same_param_count(build_torch(cfg), variables)
    timing = time_torch_training(cfg, B, T, args.optimizer, steps=args.steps, repeats=args.repeats)
    tps = timing.tokens_per_s
    print(f"{name:12s} params {n:>10,} (= nlm_jax)  B={B} T={T}  {args.optimizer}: "
          f"median {statistics.median(tps):,.0f} tokens/s  (repeats: {', '.join(f'{t:,.0f}' for t in tps)}; "
          f"cpu/wall {sum(timing.cpu_seconds) / sum(timing.seconds):.2f})", flush=True)
  if args.nanogpt:
    result = run_nanogpt_shakespeare_char(args.nanogpt)
    print(f"nanoGPT shakespeare_char: wall {result['wall_s']:.1f} s (training only {result['train_s']:.1f} s), "
          f"final val loss {result['val_loss']:.4f}, train loss {result['train_loss']:.4f}, "
          f"{result['params']:,} params")


if __name__ == "__main__":
  main()
