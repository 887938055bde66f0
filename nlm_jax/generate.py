"""Autoregressive sampling: w_{t+1} ~ softmax(logits_t / τ), restricted to the top k tokens
and/or the smallest set of tokens with probability ≥ p (nucleus), greedy when τ = 0.

With `use_cache=True` each new token costs one step of the model: the Transformer appends to
its KV cache, RNN/LSTM carry their state, the FNN its window. With `use_cache=False` every step
recomputes the whole context (a fixed-size window, so it compiles once) — the baseline the cache
is measured against. A Transformer context longer than T_max keeps the last T_max/2 tokens and
refills the cache from them.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def sample_logits(logits_BxV: Array, key: Array, temperature: float = 1.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None) -> Array:
  """Next-token ids (B,) from logits (B, V)."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV / temperature
  if top_k is not None and top_k < logits_BxV.shape[-1]:
    kth = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth, -jnp.inf, logits_BxV)
  if top_p is not None and top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    cum_BxV = jnp.cumsum(jax.nn.softmax(sorted_BxV, axis=-1), axis=-1)
    # Keep the tokens up to and including the first one where the mass reaches p.
    cutoff_index = jnp.sum(cum_BxV < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_BxV, cutoff_index, axis=-1)
    logits_BxV = jnp.where(logits_BxV < cutoff, -jnp.inf, logits_BxV)
  return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


class Sampler:
  """Compiled prefill and step functions for one model and one set of sampling options."""

  def __init__(self, model, params, temperature: float = 1.0, top_k: Optional[int] = None,
               top_p: Optional[float] = None):
    self.model, self.params = model, params
    self.context = getattr(model.cfg, "context", None) if model.cfg.arch == "transformer" else None
    sample = lambda logits, key: sample_logits(logits, key, temperature, top_k, top_p)

    def prefill(params, tokens_1xT, carry, key):
      out = model.apply({"params": params}, tokens_1xT, carry)
      return sample(out.logits[:, -1], key), out.carry

    def recompute(params, window_1xS, length, key):
      out = model.apply({"params": params}, window_1xS)
      return sample(jax.lax.dynamic_index_in_dim(out.logits, length - 1, axis=1, keepdims=False), key)

    def decode(params, prompt_1xP, carry, key, n):
      """The whole sampling loop on the device: prefill, then n−1 one-token steps."""
      first, carry = prefill(params, prompt_1xP, carry, jax.random.fold_in(key, 0))

      def step(i, loop):
        tokens_N, carry = loop
        token_1x1 = jax.lax.dynamic_slice_in_dim(tokens_N, i - 1, 1)[None]
        out = model.apply({"params": params}, token_1x1, carry)
        return tokens_N.at[i].set(sample(out.logits[:, -1], jax.random.fold_in(key, i))[0]), out.carry

      tokens_N = jnp.zeros((n,), jnp.int32).at[0].set(first[0])
      return jax.lax.fori_loop(1, n, step, (tokens_N, carry))[0]

    self._prefill = jax.jit(prefill)
    self._recompute = jax.jit(recompute)
    self._decode = jax.jit(decode, static_argnums=4)

  def generate(self, prompt_ids: list[int], max_new_tokens: int, key: Array, use_cache: bool = True,
               window: Optional[int] = None, on_token: Callable[[int], None] | None = None) -> list[int]:
    """The prompt followed by `max_new_tokens` sampled ids; `on_token` sees each as it comes.
    `window` (recompute mode) is the fixed context length recomputed per step.

    Token i+1 (0-based) is drawn with `fold_in(key, i)` on every path, so the same key gives the
    same text whether it is streamed, decoded in one compiled loop, or recomputed.
    """
    if not prompt_ids:
      raise ValueError("the prompt must hold at least one token")
    if max_new_tokens <= 0:
      return list(prompt_ids)
    ids = list(prompt_ids)
    if use_cache:
      carry, start = self._fresh(ids)
      fits = self.context is None or len(ids) - start + max_new_tokens <= self.context
      if on_token is None and fits:  # nothing to stream: one device loop, no host round trips
        new = self._decode(self.params, jnp.asarray([ids[start:]], jnp.int32), carry, key, max_new_tokens)
        return ids + [int(t) for t in jax.device_get(new)]
      position = len(ids) - start  # positions in the cache (Transformer)
      nxt, carry = self._prefill(self.params, jnp.asarray([ids[start:]], jnp.int32), carry,
                                 jax.random.fold_in(key, 0))
      for i in range(max_new_tokens):
        token = int(nxt[0])
        ids.append(token)
        if on_token:
          on_token(token)
        if i + 1 == max_new_tokens:
          break
        if self.context is not None and position >= self.context:  # cache full: keep the last half
          carry, start = self._fresh(ids, self.context // 2)
          tokens = jnp.asarray([ids[start:]], jnp.int32)
          position = len(ids) - start
        else:
          tokens = nxt[:, None]
          position += 1
        nxt, carry = self._prefill(self.params, tokens, carry, jax.random.fold_in(key, i + 1))
      return ids
    S = window or self.context or len(ids) + max_new_tokens
    for i in range(max_new_tokens):
      ctx = ids[-S:]
      window_1xS = jnp.asarray([ctx + [0] * (S - len(ctx))], jnp.int32)
      token = int(self._recompute(self.params, window_1xS, len(ctx), jax.random.fold_in(key, i))[0])
      ids.append(token)
      if on_token:
        on_token(token)
    return ids

  def _fresh(self, ids: list[int], keep: Optional[int] = None):
    """An initial carry, and where in `ids` the tokens to feed it start."""
    carry = self.model.initial_carry(1)
    if self.context is None:
      return carry, 0
    keep = keep or self.context
    return carry, max(0, len(ids) - keep)


def generate_text(model, params, tokenizer, prompt: str, max_new_tokens: int, seed: int = 0,
                  temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                  stream: Callable[[str], None] | None = None) -> str:
  """Samples a continuation of `prompt`; `stream` receives the text piece by piece."""
  prompt_ids = [int(i) for i in tokenizer.encode(prompt)] if prompt else [tokenizer.start_id]
  sampler = Sampler(model, params, temperature, top_k, top_p)
  n_prompt = len(prompt_ids)
  printed = [tokenizer.decode(prompt_ids[n_prompt:])]
  generated: list[int] = []

  def on_token(token):
    generated.append(token)
    text = tokenizer.decode(generated)
    if stream and not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
      stream(text[len(printed[0]):])
      printed[0] = text

  sampler.generate(prompt_ids, max_new_tokens, jax.random.key(seed), on_token=on_token)
  final = tokenizer.decode(generated)
  if stream and len(final) > len(printed[0]):
    stream(final[len(printed[0]):])
  return final
