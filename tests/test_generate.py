"""Sampling: N continuations in one batched call; text joined by the tokenizer that made the ids."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from support import overrides, run_cli, train, write_corpus

from nlm_jax import models
from nlm_jax.data import tokenizers
from nlm_jax.generate import Sampler, generate_text, prompt_ids, sample_logits

TEXT = "the cat sat on the mat\nthe dog sat\n\nand then a bird flew over the mat\n"


def tiny_model(arch: str, vocab_size: int):
  cfg = {"transformer": models.TransformerConfig(vocab_size=vocab_size, d_model=16, n_heads=2, n_layers=1,
                                                 context=16),
         "lstm": models.LSTMConfig(vocab_size=vocab_size, d_embed=8, d_hidden=8, n_layers=1),
         "fnn": models.FNNConfig(vocab_size=vocab_size, context=3, d_embed=4, d_hidden=8)}[arch]
  model = models.build(cfg)
  params = model.init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"]
  return model, params


@pytest.mark.parametrize("arch", ["transformer", "lstm"])
def test_a_batch_of_samples_agrees_on_every_path(arch):
  """B rows at once: streamed, compiled-loop and recomputed decoding give the same rows; rows differ
  from each other; the transformer's context overflow (refill from the last half) works per batch."""
  model, params = tiny_model(arch, 13)
  sampler = Sampler(model, params, temperature=3.0)
  prompt, n, key = [1, 2, 3], 6, jax.random.key(3)
  streamed = []
  a = sampler.generate_batch(prompt, 4, n, key, on_tokens=streamed.append)
  b = sampler.generate_batch(prompt, 4, n, key)
  c = sampler.generate_batch(prompt, 4, n, key, use_cache=False, window=len(prompt) + n)
  assert a == b == c
  assert len(a) == 4 and all(row[:3] == prompt and len(row) == 3 + n for row in a)
  assert [list(col) for col in zip(*[row[3:] for row in a])] == streamed  # one id per row per step
  assert len({tuple(row) for row in a}) > 1  # four draws, not one draw copied
  greedy = Sampler(model, params, temperature=0.0).generate_batch(prompt, 4, n, key, use_cache=False)
  assert greedy[0] == greedy[1] == greedy[2] == greedy[3]
  if arch == "transformer":  # 3 + 20 tokens overflow the 16-token context
    long = sampler.generate_batch(prompt, 4, 20, key)
    assert all(len(row) == 23 for row in long) and [row[:3 + n] for row in long] == a  # same draws until then


def test_word_level_text_joins_prompt_and_continuation_with_spaces():
  tok = tokenizers.WordTokenizer.train(TEXT)
  model, params = tiny_model("transformer", tok.vocab_size)
  assert prompt_ids(tok, "the cat") == [tok.index["the"], tok.index["cat"]]  # no <eos> after the prompt
  assert prompt_ids(tok, "the cat\n")[-1] == tok.eos_id  # unless the prompt ends its line
  assert prompt_ids(tok, "") == [tok.start_id]
  texts = generate_text(model, params, tok, "the", 12, seed=1, num_samples=3)
  assert len(texts) == 3
  for text in texts:
    assert text.startswith("the ") or text.startswith("the\n"), text
    words = text.split()
    assert all(w in tok.index for w in words), text  # every word a vocabulary word: none glued together
    assert len(words) + text.count("\n") == 13  # the prompt's word and 12 sampled tokens
  assert "<unk>" in generate_text(model, params, tok, "the zebra", 2)[0]  # the prompt as the model saw it
  streamed = []
  whole = generate_text(model, params, tok, "the", 12, seed=1, stream=streamed.append)[0]
  assert "".join(streamed) == whole  # streaming prints the text it returns


def test_word_detokenization_roundtrips_and_extends():
  tok = tokenizers.WordTokenizer.train(TEXT)
  ids = tok.encode(TEXT)
  assert tok.decode(ids) == TEXT
  for k in range(1, len(ids)):
    assert tok.decode(ids[:k + 1]).startswith(tok.decode(ids[:k]))  # streaming prints a prefix each time


def test_char_and_byte_prompts_are_printed_as_given():
  for tok in (tokenizers.CharTokenizer.train(TEXT + "T"), tokenizers.ByteTokenizer()):
    model, params = tiny_model("lstm", tok.vocab_size)
    text = generate_text(model, params, tok, "The", 5, seed=0)[0]
    assert text.startswith("The")
    empty = generate_text(model, params, tok, "", 5, seed=0)[0]
    assert len(tok.encode(empty)) <= 5  # the start id is not shown


def test_cli_generate_num_samples(tmp_path, monkeypatch):
  monkeypatch.setenv("NLM_JAX_CACHE", str(tmp_path / "cache"))
  corpus = write_corpus(tmp_path / "corpus.txt")
  train(*overrides(tmp_path / "r", corpus, "lstm", "streams", steps=4, tokenizer__kind="word"))
  code, out, err = run_cli("generate", "--workdir", tmp_path / "r", "--prompt", "the", "--num-samples", 3,
                           "--max-new-tokens", 6, "--seed", 2)
  assert code == 0, err
  samples = out.split("--- sample ")[1:]
  assert len(samples) == 3 and all(s.startswith(f"{i + 1} of 3 ---\n") for i, s in enumerate(samples))
  for s in samples:
    text = s.split("---\n", 1)[1]
    assert text.startswith("the ") or text.startswith("the\n")
    assert not text.startswith("thethe")
  code, out, err = run_cli("generate", "--workdir", tmp_path / "r", "--prompt", "the", "--num-samples", 0)
  assert code == 2 and "--num-samples" in err


def test_a_tiny_temperature_samples_the_most_probable_token():
  """T → 0 is greedy: logits / T overflowed to inf (NaN probabilities, arbitrary tokens) below
  ~1e-38; the row's largest logit is taken out first."""
  from nlm_jax.generate import sample_logits

  logits = jnp.asarray([[1.0, 3.0, 2.0, -1.0], [0.5, -2.0, 0.25, 0.0]])
  key = jax.random.key(0)
  for t in (1e-3, 1e-30, 1e-39, 1e-45):
    for i in range(5):
      np.testing.assert_array_equal(sample_logits(logits, jax.random.fold_in(key, i), t), [1, 0])


def draws(logits, n: int = 4000, seed: int = 0, **options) -> np.ndarray:
  """`n` independent draws of `sample_logits` from one row of logits (the row repeated n times)."""
  rows = jnp.tile(jnp.asarray(logits, jnp.float32), (n, 1))
  return np.asarray(sample_logits(rows, jax.random.key(seed), **options))


def test_top_k_draws_from_exactly_the_k_largest_logits():
  """k = 2 of [1, 3, 2, 0.5, 2.5]: tokens 1 and 4 only, both drawn, in the ratio e^3 : e^2.5."""
  counts = np.bincount(draws([1.0, 3.0, 2.0, 0.5, 2.5], top_k=2), minlength=5)
  assert set(np.flatnonzero(counts)) == {1, 4}
  assert counts[1] / counts.sum() == pytest.approx(1 / (1 + np.exp(-0.5)), abs=0.03)
  assert set(draws([1.0, 3.0, 2.0], top_k=3)) == {0, 1, 2}  # k = V: every token


def test_top_p_keeps_the_fewest_tokens_whose_mass_reaches_p():
  """Probabilities [0.3, 0.2, 0.5], p = 0.6: 0.5 alone falls short, 0.5 + 0.3 reaches it, so tokens 2
  and 0 (the one crossing p included), renormalized to 5 : 3; token 1 never."""
  counts = np.bincount(draws(np.log([0.3, 0.2, 0.5]), top_p=0.6), minlength=3)
  assert set(np.flatnonzero(counts)) == {0, 2}
  assert counts[2] / counts.sum() == pytest.approx(5 / 8, abs=0.03)


def random_params(params, seed: int = 0, scale: float = 1.0):
  """`params` redrawn N(0, scale²): a tiny model at its initialization barely looks at its context,
  and a test of which context a draw saw could not tell one from another."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(scale * rng.standard_normal(p.shape), p.dtype), params)


def reference_draws(model, params, rows, P: int, key, temperature: float, start) -> np.ndarray:
  """The sampled part of `rows` (B, P + n) as the docs define it: step j draws
  sample_logits(the logits after rows[:, start(j) : P + j], fold_in(key, j))."""
  rows = np.asarray(rows)
  n = rows.shape[1] - P
  width = max(P + j - start(j) for j in range(n))
  apply = jax.jit(lambda ids: model.apply({"params": params}, ids).logits)
  out = []
  for j in range(n):
    context = rows[:, start(j):P + j]  # padded on the right: a causal model's earlier logits ignore it
    logits = apply(jnp.asarray(np.pad(context, ((0, 0), (0, width - context.shape[1])))))[:, context.shape[1] - 1]
    out.append(np.asarray(sample_logits(logits, jax.random.fold_in(key, j), temperature)))
  return np.stack(out, axis=1)


def overflow_starts(P: int, context: int):
  """Where a Transformer's KV cache starts at each step: when it is full it keeps the last context // 2
  tokens (the one just drawn included) and goes on from them."""
  starts = [0]

  def start(j):
    while len(starts) <= j:
      i = len(starts)
      s = starts[-1]
      starts.append(P + i - context // 2 if P + i - 1 - s >= context else s)
    return starts[j]

  return start


@pytest.mark.parametrize("arch,path", [("lstm", "loop"), ("lstm", "stream"), ("lstm", "window"),
                                       ("transformer", "loop"), ("transformer", "stream"),
                                       ("transformer", "window"), ("transformer", "overflow")])
def test_step_j_draws_from_its_own_context_with_fold_in_key_j(arch, path):
  """Every path (compiled loop, streamed steps, recomputed windows, the refilled KV cache) draws step j
  with fold_in(key, j) from the logits after exactly the tokens it should see: the whole row; the last
  `window` tokens; after a Transformer's cache overflows, the last context // 2 tokens and those since."""
  model, params = tiny_model(arch, 13)
  params = random_params(params)
  sampler = Sampler(model, params, temperature=3.0)
  prompt, key, B = [1, 2, 3], jax.random.key(5), 3
  n, window = (24, None) if path == "overflow" else (8, 5)
  if path == "window":
    rows = sampler.generate_batch(prompt, B, n, key, use_cache=False, window=window)
    start = lambda j: max(0, len(prompt) + j - window)
  else:
    rows = sampler.generate_batch(prompt, B, n, key, on_tokens=[].append if path == "stream" else None)
    start = overflow_starts(len(prompt), model.cfg.context) if path == "overflow" else (lambda j: 0)
  rows = np.asarray(rows)
  assert rows.shape == (B, len(prompt) + n) and (rows[:, :3] == prompt).all()
  want = reference_draws(model, params, rows, len(prompt), key, 3.0, start)
  np.testing.assert_array_equal(rows[:, len(prompt):], want)
  assert len(set(rows[0, len(prompt):])) > 2  # draws that vary, so a key reused would show


@pytest.mark.parametrize("arch", ["transformer", "lstm"])
def test_zero_new_tokens_give_the_prompt_back_on_every_path(arch):
  model, params = tiny_model(arch, 13)
  sampler = Sampler(model, params)
  prompt, key, steps = [1, 2, 3], jax.random.key(0), []
  assert sampler.generate_batch(prompt, 2, 0, key) == [prompt, prompt]
  assert sampler.generate_batch(prompt, 2, 0, key, on_tokens=steps.append) == [prompt, prompt]
  assert sampler.generate_batch(prompt, 2, 0, key, use_cache=False) == [prompt, prompt]
  assert sampler.generate(prompt, 0, key) == prompt and steps == []
  tok = tokenizers.CharTokenizer.train(TEXT)
  model, params = tiny_model(arch, tok.vocab_size)
  streamed = []
  assert generate_text(model, params, tok, "the", 0, stream=streamed.append) == ["the"]
  assert generate_text(model, params, tok, "the", 0, num_samples=2) == ["the", "the"]
  assert "".join(streamed) == "the"


class BigramLM:
  """A stand-in language model for the sampler: the next token's logits are the row of a (V, V) table
  (the params) picked by the last token."""

  cfg = types.SimpleNamespace(arch="bigram")

  def initial_carry(self, batch_size: int):
    return jnp.zeros((batch_size,), jnp.int32)

  def apply(self, variables, tokens_BxT, carry=None):
    return models.LMOutput(variables["params"][tokens_BxT], tokens_BxT[:, -1], None)


def test_streaming_waits_for_whole_characters():
  """A byte-level model writing 'é' (2 bytes) and '€' (3 bytes): the stream never shows half a
  character (U+FFFD) and adds up to the text returned."""
  tok = tokenizers.ByteTokenizer()
  text = "aé€!"
  ids = list(text.encode("utf-8"))
  table = np.full((tok.vocab_size, tok.vocab_size), -10.0, np.float32)
  table[ids[:-1], ids[1:]] = 10.0  # each byte names the next
  streamed = []
  whole = generate_text(BigramLM(), jnp.asarray(table), tok, "a", len(ids) - 1, temperature=0.0,
                        stream=streamed.append)[0]
  assert whole == text
  assert "".join(streamed) == text and not any("\ufffd" in piece for piece in streamed)
  assert streamed[0] == "a" and "é" in streamed and "€" in streamed
