r"""Interpolated Kneser–Ney n-gram language models, vectorized with NumPy (the baseline of
Bengio et al. 2003 and of every neural LM since).

For a word w after the context h = w_{t−n+1..t−1}, with c(·) raw counts and N₁₊ type counts:

    P_n(w | h) = max(c(h w) − D, 0) / c(h)  +  γ(h) P_{n−1}(w | h⁻)            (highest order)
    P_k(w | h) = max(N₁₊(• h w) − D, 0) / N₁₊(• h •)  +  γ(h) P_{k−1}(w | h⁻)   (lower orders:
                                                              continuation counts, 1 < k < n)
    γ(h) = D · N₁₊(h •) / (the denominator above),     h⁻ = h without its first word
    P_1(w) = N₁₊(• w) / N₁₊(• •)                                   (the continuation unigram)

and a context never seen passes its mass down unchanged (γ = 1, no discounted term). With one
discount D this is exactly `nltk.lm.KneserNeyInterpolated` (tests/test_ngram.py checks every
probability against it), nltk's flaw included: at the lower orders γ counts a D for every gram
seen after h, also for grams whose continuation count is 0 (those that only ever follow the BOS
padding), which get no discounted term to pay for it, so a distribution can sum to more than 1
(1.014 after ⟨BOS BOS⟩, up to 1.15, in a review's 3-gram of 40 random sentences) and perplexity
comes out optimistic. Measure with the default, `discount="modified"`, which counts only grams
seen (every distribution sums to 1; a test checks it): Chen & Goodman's modified Kneser–Ney,
three discounts per order, D₁, D₂, D₃₊, chosen from the counts-of-counts n₁..n₄ of that order,

    Y = n₁ / (n₁ + 2 n₂),   D₁ = 1 − 2Y n₂/n₁,   D₂ = 2 − 3Y n₃/n₂,   D₃₊ = 3 − 4Y n₄/n₃,
    γ(h) = (D₁ N₁(h •) + D₂ N₂(h •) + D₃₊ N₃₊(h •)) / denominator,

with the unigram level discounted too and interpolated with the uniform distribution over the
W ids (the vocabulary, and BOS/EOS where they lie beyond it), so every id has a non-zero probability.

Sentences are padded as nltk pads them: n−1 BOS ids before, n−1 EOS ids after. Every k-gram
gets an integer id by pairing: id(w_1..w_k) = index of id(w_1..w_{k−1})·W + w_k among the
sorted distinct keys, so counting is `np.unique` and lookup is `np.searchsorted`.
"""

from __future__ import annotations

from typing import Iterable, Sequence, Union

import numpy as np

_UNSEEN = -1


class KneserNey:
  """An interpolated Kneser–Ney model of `order` n over token ids in [0, vocab_size).

      lm = KneserNey(order=3, vocab_size=V, bos_id=V, eos_id=V + 1).fit(train_sentences)
      logp = lm.log_prob(test_sentences)      # natural log of each scored token's probability
      ppl = np.exp(-logp.mean())

  bos_id / eos_id may be ids of the vocabulary or beyond it; scoring covers the words of each
  sentence and its n−1 EOS paddings, not the BOS paddings (as nltk's perplexity over padded
  n-grams).
  """

  def __init__(self, order: int, vocab_size: int, bos_id: int, eos_id: int,
               discount: Union[float, str] = "modified"):
    if order < 1:
      raise ValueError(f"order must be ≥ 1, got {order}")
    if not (discount == "modified" or (isinstance(discount, (int, float)) and 0 < discount < 1)):
      raise ValueError(f"discount must be in (0, 1) or 'modified', got {discount!r}")
    self.order, self.vocab_size, self.bos_id, self.eos_id, self.discount = (
        order, vocab_size, bos_id, eos_id, discount)
    self.W = max(vocab_size, bos_id + 1, eos_id + 1)  # the alphabet the keys pair over

  # ------------------------------------------------------------------------- counting

  def _padded(self, sentences: Iterable[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """All sentences padded and concatenated, and each position's sentence index."""
    pad = self.order - 1
    pieces, owner = [], []
    for i, s in enumerate(sentences):
      s = np.asarray(s, np.int64)
      pieces.append(np.concatenate([np.full(pad, self.bos_id), s, np.full(pad, self.eos_id)]))
      owner.append(np.full(len(pieces[-1]), i))
    if not pieces:
      raise ValueError("no sentences")
    return np.concatenate(pieces), np.concatenate(owner)

  def _gram_ids(self, tokens: np.ndarray, owner: np.ndarray, fit: bool) -> list[np.ndarray]:
    """ids[k][t] = id of the (k+1)-gram tokens[t:t+k+1] (−1: crosses a sentence end or unseen)."""
    n = len(tokens)
    ids = [tokens.copy()]
    if fit:
      self.keys = [np.arange(self.W, dtype=np.int64)]
    for k in range(1, self.order):
      prev = np.full(n, _UNSEEN, np.int64)
      prev[:n - k] = ids[k - 1][:n - k]
      last = np.full(n, 0, np.int64)
      last[:n - k] = tokens[k:]
      valid = (prev >= 0) & (np.arange(n) < n - k)
      valid[:n - k] &= owner[:n - k] == owner[k:]
      key = prev * self.W + last
      out = np.full(n, _UNSEEN, np.int64)
      if fit:
        uniq, inverse = np.unique(key[valid], return_inverse=True)
        self.keys.append(uniq)
        out[valid] = inverse
      else:
        uniq = self.keys[k]
        pos = np.searchsorted(uniq, key[valid])
        pos_ok = pos < len(uniq)
        hit = np.zeros(valid.sum(), bool)
        hit[pos_ok] = uniq[pos[pos_ok]] == key[valid][pos_ok]
        out[np.flatnonzero(valid)[hit]] = pos[hit]
      ids.append(out)
    return ids

  def fit(self, sentences: Iterable[Sequence[int]]) -> "KneserNey":
    """Counts every k-gram (k = 1..n) of the padded sentences."""
    tokens, owner = self._padded(sentences)
    ids = self._gram_ids(tokens, owner, fit=True)
    n_grams = [len(k) for k in self.keys]
    # count[k][g]: occurrences of (k+1)-gram g; prefix[k][g]: id of its first k words.
    self.count = [np.bincount(i[i >= 0], minlength=m).astype(np.float64) for i, m in zip(ids, n_grams)]
    self.prefix = [None] + [self.keys[k] // self.W for k in range(1, self.order)]
    # left[k][g] = N₁₊(• g): distinct (k+2)-grams whose last k+1 words are g.
    self.left = []
    for k in range(self.order - 1):
      starts = np.flatnonzero(ids[k + 1] >= 0)
      _, first = np.unique(ids[k + 1][starts], return_index=True)
      suffix = ids[k][starts[first] + 1]
      self.left.append(np.bincount(suffix, minlength=n_grams[k]).astype(np.float64))
    self.left.append(None)  # no continuation counts at the highest order
    if self.discount == "modified":
      self.D = [self._modified_discounts(self.count[k] if k == self.order - 1 else self.left[k])
                for k in range(self.order)]
    return self

  @staticmethod
  def _modified_discounts(counts: np.ndarray) -> np.ndarray:
    """(D₁, D₂, D₃₊) from the counts-of-counts n₁..n₄ (Chen & Goodman 1998, eq. 26)."""
    n = [max(float(np.sum(counts == i)), 1.0) for i in (1, 2, 3, 4)]
    Y = n[0] / (n[0] + 2 * n[1])
    return np.clip(np.array([1 - 2 * Y * n[1] / n[0], 2 - 3 * Y * n[2] / n[1], 3 - 4 * Y * n[3] / n[2]]), 0.0, None)

  # ------------------------------------------------------------------------- scoring

  def _discounted(self, level: int, c: np.ndarray):
    """max(c − D, 0) for the counts c of a level, and each count's D (for γ's numerator)."""
    if self.discount == "modified":
      D = self.D[level][np.clip(c.astype(np.int64), 1, 3) - 1] * (c > 0)
    else:
      D = np.where(c > 0, float(self.discount), 0.0)
    return np.maximum(c - D, 0.0), D

  def _gamma_numerators(self, level: int) -> np.ndarray:
    """Σ over the words w seen after each context h at this level of the discount D(c(h w)):
    D · N₁₊(h •) for one discount (every gram counted here was seen: nltk's
    `_count_values_gt_zero(counts[h])`), D₁N₁ + D₂N₂ + D₃₊N₃₊ for modified KN."""
    if self.discount == "modified":
      _, D = self._discounted(level, self._level_counts(level))
    else:
      D = np.full(len(self.keys[level]), float(self.discount))
    return np.bincount(self.prefix[level], weights=D, minlength=len(self.keys[level - 1]))

  def _level_counts(self, level: int) -> np.ndarray:
    return self.count[level] if level == self.order - 1 else self.left[level]

  def log_prob(self, sentences: Iterable[Sequence[int]]) -> np.ndarray:
    """ln P(w_t | w_{t−n+1..t−1}) of every scored token: each sentence's words and its n−1 EOS."""
    tokens, owner = self._padded(sentences)
    ids = self._gram_ids(tokens, owner, fit=False)
    pad, n = self.order - 1, len(tokens)
    # Score position t+pad (the word), context tokens[t:t+pad]: skip the BOS paddings.
    first = np.r_[0, np.flatnonzero(owner[1:] != owner[:-1]) + 1]
    is_scored = np.ones(n, bool)
    for p in range(pad):
      is_scored[first + p] = False
    t_word = np.flatnonzero(is_scored)
    words = tokens[t_word]
    p = self._unigram(words, ids[0][t_word])
    for level in range(1, self.order):
      start = t_word - level  # the (level+1)-gram ending at the word
      gram = ids[level][start]
      ctx = ids[level - 1][start]
      p = self._interpolate(level, gram, ctx, p)
    with np.errstate(divide="ignore"):  # a probability of 0 (nltk's KN for an unseen word) is −inf
      return np.log(p)

  def _unigram(self, words: np.ndarray, unigram_ids: np.ndarray) -> np.ndarray:
    """P₁: continuation counts N₁₊(• w) (raw counts c(w) for a unigram model)."""
    left = self._level_counts(0)
    if self.discount == "modified":
      disc, _ = self._discounted(0, left)
      gamma = (left.sum() - disc.sum()) / left.sum()
      return disc[unigram_ids] / left.sum() + gamma / self.W
    return left[unigram_ids] / left.sum()

  def _interpolate(self, level: int, gram: np.ndarray, ctx: np.ndarray, lower: np.ndarray) -> np.ndarray:
    counts = self._level_counts(level)
    seen_ctx = ctx >= 0
    # Denominators per context: c(h) at the highest order, N₁₊(• h •) below.
    denom_all = np.bincount(self.prefix[level], weights=counts, minlength=len(self.keys[level - 1]))
    raw_ctx = np.bincount(self.prefix[level], weights=self.count[level], minlength=len(self.keys[level - 1]))
    denom = np.where(seen_ctx, denom_all[np.maximum(ctx, 0)], 0.0)
    has_ctx = seen_ctx & (raw_ctx[np.maximum(ctx, 0)] > 0) & (denom > 0)
    c = np.where(gram >= 0, counts[np.maximum(gram, 0)], 0.0)
    disc, _ = self._discounted(level, c)
    gamma_num = self._gamma_numerators(level)[np.maximum(ctx, 0)]
    safe = np.where(has_ctx, denom, 1.0)
    alpha = np.where(has_ctx, disc / safe, 0.0)
    gamma = np.where(has_ctx, gamma_num / safe, 1.0)
    return alpha + gamma * lower

  def perplexity(self, sentences: Iterable[Sequence[int]]) -> float:
    return float(np.exp(-np.mean(self.log_prob(list(sentences)))))

  def num_ngrams(self) -> list[int]:
    """Distinct k-grams counted, k = 1..n (the model's size)."""
    return [int(np.sum(c > 0)) for c in self.count]
