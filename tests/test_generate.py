"""Sampling: N continuations in one batched call; text joined by the tokenizer that made the ids."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from support import overrides, run_cli, train, write_corpus

from nlm_jax import models
from nlm_jax.data import tokenizers
from nlm_jax.generate import Sampler, generate_text, prompt_ids

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
