"""Autoregressive sampling: w_{t+1} ~ softmax(logits_t / τ), restricted to the top k tokens
and/or the smallest set of tokens with probability ≥ p (nucleus), greedy when τ = 0.

With `use_cache=True` each new token costs one step of the model: the Transformer appends to
its KV cache, RNN/LSTM carry their state, the FNN its window. With `use_cache=False` every step
recomputes the whole context (a fixed-size window, so it compiles once) — the baseline the cache
is measured against. A Transformer context longer than T_max keeps the last T_max/2 tokens and
refills the cache from them. Every path samples B rows at once (B continuations of one prompt).

The text of a sample is the tokenizer's decoding of prompt and continuation together
(`generate_text`), so a word-level model prints `The cat`, not `Thecat`.
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
  # shifted by the row's largest logit first: a tiny temperature then sends the others to −inf and
  # the largest to 0 (greedy in the limit), where logits / T alone overflowed to inf and gave NaN
  logits_BxV = (logits_BxV - jnp.max(logits_BxV, axis=-1, keepdims=True)) / temperature
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
  """Compiled prefill and step functions for one model and one set of sampling options.
  B rows are sampled at once: B continuations of one prompt, each row drawing its own tokens."""

  def __init__(self, model, params, temperature: float = 1.0, top_k: Optional[int] = None,
               top_p: Optional[float] = None):
    self.model, self.params = model, params
    self.context = getattr(model.cfg, "context", None) if model.cfg.arch == "transformer" else None
    sample = lambda logits, key: sample_logits(logits, key, temperature, top_k, top_p)

    def prefill(params, tokens_BxT, carry, key):
      out = model.apply({"params": params}, tokens_BxT, carry)
      return sample(out.logits[:, -1], key), out.carry

    def recompute(params, window_BxS, length, key):
      out = model.apply({"params": params}, window_BxS)
      return sample(jax.lax.dynamic_index_in_dim(out.logits, length - 1, axis=1, keepdims=False), key)

    def decode(params, prompt_BxP, carry, key, n):
      """The whole sampling loop on the device: prefill, then n−1 one-token steps."""
      first_B, carry = prefill(params, prompt_BxP, carry, jax.random.fold_in(key, 0))

      def step(i, loop):
        tokens_BxN, carry = loop
        token_Bx1 = jax.lax.dynamic_slice_in_dim(tokens_BxN, i - 1, 1, axis=1)
        out = model.apply({"params": params}, token_Bx1, carry)
        return tokens_BxN.at[:, i].set(sample(out.logits[:, -1], jax.random.fold_in(key, i))), out.carry

      tokens_BxN = jnp.zeros((prompt_BxP.shape[0], n), jnp.int32).at[:, 0].set(first_B)
      return jax.lax.fori_loop(1, n, step, (tokens_BxN, carry))[0]

    self._prefill = jax.jit(prefill)
    self._recompute = jax.jit(recompute)
    self._decode = jax.jit(decode, static_argnums=4)

  def generate(self, prompt_ids: list[int], max_new_tokens: int, key: Array, use_cache: bool = True,
               window: Optional[int] = None, on_token: Callable[[int], None] | None = None) -> list[int]:
    """One continuation: `generate_batch` with one row."""
    on_tokens = None if on_token is None else (lambda tokens: on_token(tokens[0]))
    return self.generate_batch(prompt_ids, 1, max_new_tokens, key, use_cache, window, on_tokens)[0]

  def generate_batch(self, prompt_ids: list[int], num_samples: int, max_new_tokens: int, key: Array,
                     use_cache: bool = True, window: Optional[int] = None,
                     on_tokens: Callable[[list[int]], None] | None = None) -> list[list[int]]:
    """`num_samples` rows, each the prompt followed by `max_new_tokens` sampled ids; `on_tokens`
    sees each step's new ids (one per row) as they come. `window` (recompute mode) is the fixed
    context length recomputed per step.

    Step i (0-based) draws with `fold_in(key, i)` on every path, so the same key gives the same
    text whether it is streamed, decoded in one compiled loop, or recomputed.
    """
    if not prompt_ids:
      raise ValueError("the prompt must hold at least one token")
    ids_BxL = np.tile(np.asarray(prompt_ids, np.int32), (num_samples, 1))
    if max_new_tokens <= 0:
      return ids_BxL.tolist()

    def append(new_B):
      nonlocal ids_BxL
      new_B = np.asarray(jax.device_get(new_B), np.int32)
      ids_BxL = np.concatenate([ids_BxL, new_B[:, None]], axis=1)
      if on_tokens:
        on_tokens(new_B.tolist())

    if use_cache:
      carry, start = self._fresh(ids_BxL)
      fits = self.context is None or ids_BxL.shape[1] - start + max_new_tokens <= self.context
      if on_tokens is None and fits:  # nothing to stream: one device loop, no host round trips
        new_BxN = self._decode(self.params, jnp.asarray(ids_BxL[:, start:]), carry, key, max_new_tokens)
        return np.concatenate([ids_BxL, np.asarray(jax.device_get(new_BxN))], axis=1).tolist()
      position = ids_BxL.shape[1] - start  # positions in the cache (Transformer)
      nxt_B, carry = self._prefill(self.params, jnp.asarray(ids_BxL[:, start:]), carry,
                                   jax.random.fold_in(key, 0))
      for i in range(max_new_tokens):
        append(nxt_B)
        if i + 1 == max_new_tokens:
          break
        if self.context is not None and position >= self.context:  # cache full: keep the last half
          carry, start = self._fresh(ids_BxL, self.context // 2)
          tokens_BxT = jnp.asarray(ids_BxL[:, start:])
          position = ids_BxL.shape[1] - start
        else:
          tokens_BxT = nxt_B[:, None]
          position += 1
        nxt_B, carry = self._prefill(self.params, tokens_BxT, carry, jax.random.fold_in(key, i + 1))
      return ids_BxL.tolist()
    S = window or self.context or ids_BxL.shape[1] + max_new_tokens
    for i in range(max_new_tokens):
      ctx_BxC = ids_BxL[:, -S:]
      window_BxS = np.pad(ctx_BxC, ((0, 0), (0, S - ctx_BxC.shape[1])))
      append(self._recompute(self.params, jnp.asarray(window_BxS), ctx_BxC.shape[1], jax.random.fold_in(key, i)))
    return ids_BxL.tolist()

  def _fresh(self, ids_BxL: np.ndarray, keep: Optional[int] = None):
    """An initial carry for B rows, and where in the rows the tokens to feed it start."""
    carry = self.model.initial_carry(ids_BxL.shape[0])
    if self.context is None:
      return carry, 0
    keep = keep or self.context
    return carry, max(0, ids_BxL.shape[1] - keep)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
  """The prompt as the model sees it: the tokenizer's own ids for the text, without the end-of-line
  id that line-based tokenizers (word, SentencePiece) put after a last line the prompt did not end;
  the tokenizer's start id for an empty prompt."""
  ids = [int(i) for i in tokenizer.encode(prompt)] if prompt else []
  eos = getattr(tokenizer, "eos_id", None)
  if ids and eos is not None and ids[-1] == eos and not prompt.endswith("\n"):
    ids = ids[:-1]
  return ids or [tokenizer.start_id]


def generate_text(model, params, tokenizer, prompt: str, max_new_tokens: int, seed: int = 0,
                  temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                  stream: Callable[[str], None] | None = None, num_samples: int = 1) -> list[str]:
  """`num_samples` continuations of `prompt`, sampled in one batch; each text is the tokenizer's
  decoding of the prompt's ids and the continuation together (so words join as the tokenizer
  joins them, and the prompt reads as the model saw it: `<unk>` for an unknown word). An empty
  prompt's start id is not shown. `stream` (one sample only) receives the text piece by piece."""
  if stream is not None and num_samples != 1:
    raise ValueError("streaming shows one sample; pass num_samples=1")
  ids = prompt_ids(tokenizer, prompt)
  hidden = len(tokenizer.decode(ids)) if not prompt else 0  # the start id's text
  text = lambda row: tokenizer.decode(row)[hidden:]
  sampler = Sampler(model, params, temperature, top_k, top_p)
  printed = [text(ids)]
  row = list(ids)
  if stream:
    stream(printed[0])

  def on_tokens(tokens):
    row.append(tokens[0])
    now = text(row)
    if now.startswith(printed[0]) and not now.endswith("\ufffd"):  # wait for a whole character
      stream(now[len(printed[0]):])
      printed[0] = now

  rows = sampler.generate_batch(ids, num_samples, max_new_tokens, jax.random.key(seed),
                                on_tokens=on_tokens if stream else None)
  texts = [text(r) for r in rows]
  if stream and texts[0] != printed[0]:
    stream(texts[0][len(printed[0]):] if texts[0].startswith(printed[0]) else "\n" + texts[0])
  return texts
