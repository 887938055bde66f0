"""Conditional decoding with a language model: given each row's prompt, the most probable
continuation up to an end token, by greedy search or beam search.

    outputs = beam_search(model, params, prompts, eos_id, beam_size=5, max_len=64, length_penalty=0.6)
    outputs = greedy(model, params, prompts, eos_id, max_len=64)      # one prompt at a time

Rows of different prompt lengths decode together in one compiled loop: at step t every row feeds
one token into the model's carry (the KV cache, the recurrent state or the FNN window) — its own
prompt token while t is inside its prompt, else its newest generated token — so no row is padded
and positions stay exact. A row's first generated token comes from the logits after its last
prompt token.

Beam search keeps, per row, K alive hypotheses and the K best finished ones (as tensor2tensor's
and fairseq's do): each step scores the K·V extensions of the alive beams by their summed
log-probability and takes the best 2K; those that end in `eos_id` join the finished set, scored
by log P / lp(length) with GNMT's lp(n) = ((5 + n) / 6)^α (Wu et al. 2016); the best K of the
others stay alive (their carries reordered by parent). At most K candidates end (one per beam),
so a hypothesis that ends never costs the beam a slot. A hypothesis still alive after `max_len`
tokens is finished there. A row stops once no alive beam can beat its best finished one (a
beam's log P only falls as it grows, so its best possible score is log P now over the largest
length penalty still ahead), and the loop once every row has stopped: the same result as
searching to `max_len`, sooner. The result per row is the finished hypothesis with the best score
(the end token removed). K = 1 is greedy search (batched: one candidate per step, whatever the
length penalty); a K as large as the number of possible hypotheses makes the search exhaustive.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
NEG = -1e9  # the score of an impossible hypothesis (finite: -inf - -inf would be NaN)


def length_penalty(n: Array, alpha: float) -> Array:
  """GNMT's lp(n) = ((5 + n) / 6)^α."""
  return ((5.0 + n) / 6.0) ** alpha


def _batch_axes(model, size: int):
  """For each leaf of the model's carry, the axis that holds the batch (where the shapes of the
  initial carry for `size` and for `size + 1` rows differ), or None (a scalar such as the KV
  cache's index)."""
  a = jax.eval_shape(lambda: model.initial_carry(size))
  b = jax.eval_shape(lambda: model.initial_carry(size + 1))

  def axis(x, y):
    diff = [i for i, (p, q) in enumerate(zip(x.shape, y.shape)) if p != q]
    return diff[0] if diff else None

  return jax.tree.map(axis, a, b)


def _reorder(carry, axes, index_N: Array):
  """The carry's rows taken at `index_N` (beams following their parents)."""
  return jax.tree.map(lambda c, ax: c if ax is None else jnp.take(c, index_N, axis=ax), carry, axes)


@functools.partial(jax.jit, static_argnames=("model", "beam_size", "max_len", "alpha", "eos_id", "prefix_lm",
                                             "min_len"))
def _beam_search(model, params, prompts_BxP: Array, lengths_B: Array, n_rows: Array | None = None, *, eos_id: int,
                 beam_size: int, max_len: int, alpha: float, prefix_lm: bool = False, min_len: int = 0):
  """(best sequence, its length, its score, tokens fed) per row; rows from `n_rows` on only fill
  the batch: they count as done from the start, so they never keep the loop going."""
  B, P = prompts_BxP.shape
  K = beam_size
  N = B * K
  V = model.cfg.vocab_size
  # Candidates per step: at most K of 2K end, so K stay alive; one beam is greedy search.
  C = 1 if K == 1 else min(2 * K, K * V)
  axes = _batch_axes(model, N)
  carry = model.initial_carry(N)
  first = 0
  if prefix_lm and P > 1:  # every prompt has P tokens: the first P − 1 enter the cache at once, seeing each other
    prefix = jnp.repeat(prompts_BxP[:, :P - 1], K, axis=0)
    carry = model.apply({"params": params}, prefix, carry, prefix_B=jnp.full((N,), P - 1, jnp.int32)).carry
    first = P - 1
  steps = P + max_len - 1  # tokens fed: the longest prompt, then up to max_len − 1 generated ones
  alive_seq = jnp.zeros((B, K, max_len), jnp.int32)
  alive_logp = jnp.tile(jnp.asarray([0.0] + [NEG] * (K - 1), jnp.float32), (B, 1))
  finished_seq = jnp.zeros((B, K, max_len), jnp.int32)
  finished_score = jnp.full((B, K), NEG, jnp.float32)
  finished_len = jnp.zeros((B, K), jnp.int32)
  done_B = jnp.zeros((B,), bool) if n_rows is None else jnp.arange(B) >= n_rows
  prompts_NxP = jnp.repeat(prompts_BxP, K, axis=0)

  def step(loop):
    t, carry, alive_seq, alive_logp, finished_seq, finished_score, finished_len, done_B = loop
    i = t + 1 - lengths_B  # (B,) the index of the token this step's logits choose, per row
    # The token fed at step t: the prompt's while inside it, else the beam's newest token.
    last_gen = jnp.take_along_axis(alive_seq, jnp.clip(i - 1, 0, max_len - 1)[:, None, None], axis=2)[..., 0]
    prompt_tok = jax.lax.dynamic_index_in_dim(prompts_NxP, jnp.minimum(t, P - 1), axis=1, keepdims=False)
    fed_N = jnp.where(jnp.repeat(t < lengths_B, K), prompt_tok, last_gen.reshape(N))
    out = model.apply({"params": params}, fed_N[:, None], carry)
    logp_BxKxV = jax.nn.log_softmax(out.logits[:, -1].astype(jnp.float32)).reshape(B, K, V)
    if min_len:  # no end before min_len tokens
      early_end = (jnp.arange(V) == eos_id)[None, None] & (i < min_len)[:, None, None]
      logp_BxKxV = jnp.where(early_end, NEG, logp_BxKxV)

    # Extend every alive beam by every token; the best C of the K·V candidates.
    cand_BxKV = (alive_logp[:, :, None] + logp_BxKxV).reshape(B, K * V)
    top_logp, top_idx = jax.lax.top_k(cand_BxKV, C)
    parent, token = top_idx // V, top_idx % V
    seq = jnp.take_along_axis(alive_seq, parent[:, :, None], axis=1)
    seq = jnp.where(jnp.arange(max_len)[None, None] == i[:, None, None], token[:, :, None], seq)
    ends = token == eos_id
    last = (i == max_len - 1)[:, None]  # this row's last token: every candidate finishes
    length = (i + 1)[:, None].astype(jnp.float32)
    possible = top_logp > NEG / 2
    done_score = jnp.where((ends | last) & possible, top_logp / length_penalty(length, alpha), NEG)
    # Finished: the best K of the old finished and the new ones.
    all_score = jnp.concatenate([finished_score, done_score], axis=1)
    all_seq = jnp.concatenate([finished_seq, seq], axis=1)
    all_len = jnp.concatenate([finished_len, jnp.broadcast_to(i[:, None] + 1, done_score.shape)], axis=1)
    new_fin_score, fin_idx = jax.lax.top_k(all_score, K)
    new_fin_seq = jnp.take_along_axis(all_seq, fin_idx[:, :, None], axis=1)
    new_fin_len = jnp.take_along_axis(all_len, fin_idx, axis=1)
    # Alive: the best K of the candidates that did not end.
    new_alive_logp, alive_idx = jax.lax.top_k(jnp.where(ends, NEG, top_logp), K)
    new_alive_seq = jnp.take_along_axis(seq, alive_idx[:, :, None], axis=1)
    new_parent = jnp.take_along_axis(parent, alive_idx, axis=1)

    # Rows still reading their prompt (i < 0), past their last token or done keep their beams.
    active = ((i >= 0) & (i < max_len) & ~done_B)[:, None]
    keep = lambda new, old: jnp.where(active.reshape(active.shape + (1,) * (new.ndim - 2)), new, old)
    parent_N = (jnp.where(active, new_parent, jnp.arange(K)[None]) + K * jnp.arange(B)[:, None]).reshape(N)
    carry = _reorder(out.carry, axes, parent_N)
    alive_seq, alive_logp = keep(new_alive_seq, alive_seq), keep(new_alive_logp, alive_logp)
    finished_seq, finished_score = keep(new_fin_seq, finished_seq), keep(new_fin_score, finished_score)
    finished_len = keep(new_fin_len, finished_len)
    # A row is done once no alive beam can beat its best finished hypothesis: log-probabilities
    # only fall as a beam grows, so a beam's final score is at most its log P now divided by the
    # largest length penalty still ahead (lp is monotone in the length: its value at one end).
    longest = jnp.maximum(length_penalty(length + 1, alpha), length_penalty(float(max_len), alpha))[:, 0]
    bound = alive_logp.max(axis=1) / longest
    done_B = done_B | (i >= max_len - 1) | ((i >= 0) & (bound < finished_score[:, 0]))
    return t + 1, carry, alive_seq, alive_logp, finished_seq, finished_score, finished_len, done_B

  loop = jax.lax.while_loop(lambda loop: (loop[0] < steps) & ~jnp.all(loop[-1]), step,
                            (jnp.asarray(first, jnp.int32), carry, alive_seq, alive_logp, finished_seq,
                             finished_score, finished_len, done_B))
  t, _, _, _, finished_seq, finished_score, finished_len, _ = loop
  return finished_seq[:, 0], finished_len[:, 0], finished_score[:, 0], t  # t: the tokens fed


def beam_search(model, params, prompts: Sequence[Sequence[int]], eos_id: int, beam_size: int = 4,
                max_len: int = 64, length_penalty: float = 0.0, batch_size: int = 64,
                return_scores: bool = False, prefix_lm: bool = False, min_len: int = 0):
  """The best continuation of each prompt (a list of ids, without the end token), `batch_size`
  prompts per compiled call. `length_penalty` is α of lp(n) = ((5 + n)/6)^α (0: none).
  With `return_scores`, also each continuation's score (log P / lp(n), the end token counted).
  `prefix_lm` (a Transformer trained as a prefix LM): all but the last token of each prompt are
  its bidirectional prefix; they enter the KV cache in one call, so the prompts of a call must
  have one length (calls are made per length; each new length compiles once). `min_len`: the
  fewest tokens a continuation has before its end (fairseq's min_len, which defaults to 1, as the
  translate task's task.min_decode_len does: the empty translation is often the model's most
  probable)."""
  if beam_size < 1 or max_len < 1:
    raise ValueError("beam_size and max_len must be ≥ 1")
  context = getattr(model.cfg, "context", None) if model.cfg.arch == "transformer" else None
  outputs, scores = [None] * len(prompts), [None] * len(prompts)
  if prefix_lm:  # calls of equal-length prompts
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
      groups.setdefault(len(p), []).append(i)
    calls = [idx[j:j + batch_size] for idx in groups.values() for j in range(0, len(idx), batch_size)]
  else:
    calls = [list(range(j, min(j + batch_size, len(prompts)))) for j in range(0, len(prompts), batch_size)]
  for call in calls:
    chunk = [list(prompts[i]) for i in call]
    if any(not p for p in chunk):
      raise ValueError("every prompt must hold at least one token")
    P = max(len(p) for p in chunk)
    if context is not None and P + max_len - 1 > context:
      raise ValueError(f"a prompt of {P} tokens and max_len={max_len} exceed the model's context ({context})")
    rows = len(chunk)
    padded = np.zeros((batch_size, P), np.int32)
    lengths = np.ones((batch_size,), np.int32)  # rows that fill the last call: one token each
    for b, p in enumerate(chunk):
      padded[b, :len(p)] = p
      lengths[b] = len(p)
    if prefix_lm:  # the rows filling the call repeat a real prompt (one length)
      padded[rows:], lengths[rows:] = padded[0], lengths[0]
    seq, length, score, _ = jax.device_get(_beam_search(
        model, params, jnp.asarray(padded), jnp.asarray(lengths), jnp.asarray(rows, jnp.int32), eos_id=int(eos_id),
        beam_size=beam_size, max_len=max_len, alpha=float(length_penalty), prefix_lm=prefix_lm,
        min_len=int(min_len)))
    for b, i in enumerate(call):
      ids = [int(x) for x in seq[b, :length[b]]]
      outputs[i] = ids[:-1] if ids and ids[-1] == eos_id else ids
      scores[i] = float(score[b])
  return (outputs, scores) if return_scores else outputs


def greedy(model, params, prompts: Sequence[Sequence[int]], eos_id: int, max_len: int = 64) -> list[list[int]]:
  """Greedy search, one prompt at a time through `generate.Sampler` at temperature 0: the most
  probable token at each step, until `eos_id` or `max_len` tokens (what beam search with one beam
  computes, batched; this is the reference it is tested against)."""
  from nlm_jax.generate import Sampler

  sampler = Sampler(model, params, temperature=0.0)
  outputs = []
  for prompt in prompts:
    new = sampler.generate(list(prompt), max_len, jax.random.key(0))[len(prompt):]
    outputs.append(new[:new.index(eos_id)] if eos_id in new else new)
  return outputs
