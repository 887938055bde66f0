"""Translation as conditional generation with the same decoder-only language model.

Each sentence pair becomes one sequence that the LM reads left to right,

    [start] source-line <eol> target-line <eol>

(<eol>: the tokenizer's end of a line: `</s>` for SentencePiece, `<eos>` for words, '\\n' for
characters), and the loss is the next-token cross-entropy on the target tokens and the final
<eol> only; the source is context. So a language model pretrained on lines of text of both
languages already knows the format, and translation is: given "[start] source <eol>", decode to
the next <eol> (`nlm_jax.decoding`: greedy or beam search, batched, with the KV cache / carried
state). Quality is corpus BLEU (`sacrebleu`) of the decoded, detokenized targets against the
reference lines.

Data: line-aligned files `data.files.<split>` + '.' + task.source_lang / task.target_lang (e.g.
`data.files.train=../shared/data/multi30k/train` → train.en, train.de; empty lines at the end are
dropped), or a TFDS translation dataset (`data.source=tfds`, `data.name=wmt14_translate/de-en`)
whose features are the language codes. The tokenizer of a run trained from scratch is fitted to
the training split's source and target lines together (a joint vocabulary: with
`tokenizer.kind=sentencepiece`, a joint BPE). Training pairs longer than task.max_len tokens are
cut (the source's end, if it is over half of them, then the target's); their count is reported
once. Translating, a source keeps its first task.max_len // 2 tokens (warned).
"""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np

from nlm_jax import config as config_lib
from nlm_jax import decoding, models, objectives
from nlm_jax.data import tokenizers
from nlm_jax.data.corpus import tfds_fields
from nlm_jax.data.files import read_text
from nlm_jax.errors import UserError
from nlm_jax.tasks import finetune
from nlm_jax.tasks.common import ExamplesRun, check_task_model, padded_length
from nlm_jax.training import checkpoint as ckpt_lib
from nlm_jax.training import optim
from nlm_jax.training.steps import LMTask, config_options

Array = jax.Array


# ----------------------------------------------------------------------------- data


def read_parallel(prefix: str, source_lang: str, target_lang: str) -> tuple[list[str], list[str]]:
  """Aligned lines of PREFIX.SOURCE and PREFIX.TARGET (trailing empty lines dropped)."""
  sides = []
  for lang in (source_lang, target_lang):
    path = f"{prefix}.{lang}"
    text = read_text(path)
    lines = text.split("\n")
    while lines and not lines[-1].strip():
      lines.pop()
    if not lines:
      raise UserError(f"data file {path} is empty")
    sides.append((path, lines))
  (src_path, src), (tgt_path, tgt) = sides
  if len(src) != len(tgt):
    raise UserError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}; the files must be line-aligned")
  return src, tgt


def read_tfds_pairs(data_cfg, split: str, source_lang: str, target_lang: str) -> tuple[list[str], list[str]]:
  """(sources, targets) of a TFDS translation split, whose features are the language codes."""
  src, tgt = tfds_fields(data_cfg, split, [source_lang, target_lang],
                         {source_lang: "task.source_lang", target_lang: "task.target_lang"})
  return [str(x) for x in src], [str(x) for x in tgt]


def end_of_line(tokenizer) -> int:
  """The id that ends a line for this tokenizer (`</s>`, `<eos>`, '\\n', byte 10)."""
  return int(tokenizer.encode("\n")[-1])


def encode_line(tokenizer, line: str) -> np.ndarray:
  """The ids of one line, ending with the end-of-line id."""
  return np.asarray(tokenizer.encode(line.replace("\n", " ") + "\n"), np.int32)


def encode_pairs(tokenizer, sources: list[str], targets: list[str], max_len: int):
  """(sequence ids, where the target starts, how many pairs were cut) of each pair: [start] +
  source + target, whole when it is at most max_len + 1 ids (max_len predictions); a longer pair
  is cut to that: the source keeps at least max_len // 2 + 1 ids with [start] (what `translate`
  keeps of a source), or more when the target needs less, and the target keeps the rest."""
  start = np.asarray([tokenizer.start_id], np.int32)
  seqs, starts, cut = [], [], 0
  for src, tgt in zip(sources, targets):
    prefix = np.concatenate([start, encode_line(tokenizer, src)])
    target = encode_line(tokenizer, tgt)
    if len(prefix) + len(target) > max_len + 1:
      cut += 1
      prefix = prefix[:max(max_len // 2 + 1, max_len + 1 - len(target))]
      target = target[:max_len + 1 - len(prefix)]
    seqs.append(np.concatenate([prefix, target]))
    starts.append(len(prefix))
  return seqs, np.asarray(starts, np.int32), cut


def collate(seqs: list[np.ndarray], starts: np.ndarray, rows: int, max_len: int) -> dict[str, np.ndarray]:
  """inputs = seq[:-1], targets = seq[1:], mask = 1 on the target's predictions; rows past the
  given examples are padding (mask 0). prefix: the inputs a prefix LM reads bidirectionally,
  [start] and the source (the source's <eol> is the first causal position: it predicts the
  target's first token, as the last prompt token does in decoding)."""
  T = padded_length(max((len(s) - 1 for s in seqs), default=1), max_len)
  inputs = np.zeros((rows, T), np.int32)
  targets = np.zeros((rows, T), np.int32)
  mask = np.zeros((rows, T), np.float32)
  prefix = np.zeros((rows,), np.int32)
  for b, (seq, start) in enumerate(zip(seqs, starts)):
    n = len(seq) - 1
    inputs[b, :n], targets[b, :n] = seq[:-1], seq[1:]
    mask[b, start - 1:n] = 1.0  # position t predicts token t+1: the target's tokens from `start`
    prefix[b] = start - 1
  return {"inputs": inputs, "targets": targets, "mask": mask, "prefix": prefix}


# ----------------------------------------------------------------------------- steps


class TranslateTask(LMTask):
  """Next-token loss on the target tokens (with label smoothing in training, if asked), read
  causally or, for a prefix LM, with the source seen in both directions."""

  batch_keys = ("inputs", "targets", "mask", "prefix")

  def __init__(self, *args, smoothing: float = 0.0, prefix_lm: bool = False, **kwargs):
    self.smoothing, self.prefix_lm = smoothing, prefix_lm
    super().__init__(*args, **kwargs)

  def _objective(self, params, batch, carry, key, deterministic: bool):
    rngs = None if deterministic else {"dropout": key}
    extra = {"prefix_B": batch["prefix"]} if self.prefix_lm else {}
    out = self.model.apply({"params": params}, batch["inputs"], None, deterministic=deterministic, rngs=rngs,
                           **extra)
    smoothing = 0.0 if deterministic else self.smoothing  # evaluation reports the likelihood
    loss_sum, count = objectives.next_token_nll(out.logits, batch["targets"], batch["mask"], smoothing)
    return loss_sum, count, None, {}


# ----------------------------------------------------------------------------- the run


class TranslateRun(ExamplesRun):
  """What the trainer needs for a translation run (the interface of `trainer.Run`)."""

  def __init__(self, cfg: config_lib.Config, tokenizer=None, mesh=None, workdir: Optional[str] = None):
    self._setup(cfg, mesh)
    t, d = cfg.task, cfg.data
    self._encoded: dict[str, tuple] = {}
    if tokenizer is None:
      src, tgt = self.pairs(d.train_split)
      tokenizer = tokenizers.train_tokenizer(cfg.tokenizer, "\n".join(src + tgt) + "\n")
    self.tokenizer = tokenizer
    self.eol = end_of_line(tokenizer)
    self.model_cfg = config_lib.model_config(cfg, tokenizer.vocab_size)
    check_task_model(t, self.model_cfg)
    self.model = models.build(self.model_cfg)
    self.tx = optim.make_optimizer(cfg.optim, cfg.train.steps, finetune.lr_groups(cfg, self.model_cfg, head=None))
    finetune.freeze(cfg, head=None)  # no new head: refused if asked for
    self.task = TranslateTask(self.model, self.tx, optim.plateau(cfg.optim), self.mesh, d.batch_size, False,
                              example_len=min(8, t.max_len), **config_options(cfg), smoothing=t.label_smoothing,
                              prefix_lm=t.prefix_lm)

  # ------------------------------------------------------------------------- data

  def read_file(self, prefix: str) -> tuple[list[str], list[str]]:
    return read_parallel(prefix, self.cfg.task.source_lang, self.cfg.task.target_lang)

  def read_tfds(self, split: str) -> tuple[list[str], list[str]]:
    return read_tfds_pairs(self.cfg.data, split, self.cfg.task.source_lang, self.cfg.task.target_lang)

  def pairs(self, split: str) -> tuple[list[str], list[str]]:
    """(source lines, target lines) of a split."""
    return self.raw(split)

  def examples(self, split: str) -> tuple[list[np.ndarray], np.ndarray]:
    """(sequence ids of each pair, where its target starts)."""
    if split not in self._encoded:
      seqs, starts, cut = encode_pairs(self.tokenizer, *self.pairs(split), self.cfg.task.max_len)
      if cut and split == self.cfg.data.train_split and jax.process_index() == 0:
        ckpt_lib.warn(f"{cut} of {len(seqs)} training pairs are longer than task.max_len={self.cfg.task.max_len} "
                      "tokens: they are cut")
      self._encoded[split] = seqs, starts
    return self._encoded[split]

  # ------------------------------------------------------------------------- evaluation

  def collate(self, indices: list[int], split: str, rows: int) -> dict[str, np.ndarray]:
    seqs, starts = self.examples(split)
    return collate([seqs[i] for i in indices], starts[indices], rows, self.cfg.task.max_len)

  def evaluate(self, params, split: str, max_batches: Optional[int], seed: int = 0, batching=None,
               bleu: bool = False) -> dict:
    """Mean NLL per target token and perplexity over a split (all of it, or its first
    `max_batches` batches); with `bleu`, also corpus BLEU of beam-search translations."""
    sums = self.eval_sums(params, split, max_batches)
    loss = float(sums["nll_sum"]) / float(sums["count"])
    out = {"loss": loss, "perplexity": float(np.exp(min(loss, 700.0))), "tokens": int(sums["count"])}
    if bleu:
      out.update(self.bleu(params, split))
    return out

  def val_scores(self, val: dict) -> dict:
    return {"val_loss": val["loss"], "val_perplexity": val["perplexity"]}

  def translate(self, params, sources: list[str], beam_size: Optional[int] = None,
                length_penalty: Optional[float] = None, max_len: Optional[int] = None) -> list[str]:
    """Detokenized translations of source lines (beam search; task.* settings by default)."""
    t = self.cfg.task
    beam_size = beam_size or t.beam_size
    alpha = t.length_penalty if length_penalty is None else length_penalty
    start = np.asarray([self.tokenizer.start_id], np.int32)
    prompts = [list(np.concatenate([start, encode_line(self.tokenizer, s)])) for s in sources]
    long = sum(len(p) > t.max_len // 2 + 1 for p in prompts)
    if long and jax.process_index() == 0:
      ckpt_lib.warn(f"{long} of {len(prompts)} source lines are longer than task.max_len // 2 = {t.max_len // 2} "
                    "tokens: translated from their first ones")
    prompts = [p[:t.max_len // 2 + 1] for p in prompts]
    limit = max_len or t.max_decode_len
    context = getattr(self.model_cfg, "context", None) if self.model_cfg.arch == "transformer" else None
    if context is not None:  # the prompt and the translation share the context
      limit = min(limit, context + 1 - max(len(p) for p in prompts))
    order = np.argsort([len(p) for p in prompts], kind="stable")  # similar lengths decode together
    out = decoding.beam_search(self.model, params, [prompts[i] for i in order], self.eol, beam_size, limit, alpha,
                               batch_size=t.decode_batch_size, prefix_lm=t.prefix_lm, min_len=t.min_decode_len)
    texts = [""] * len(sources)
    for i, ids in zip(order, out):
      texts[i] = self.tokenizer.decode(ids).strip()
    return texts

  def bleu(self, params, split: str) -> dict:
    """Corpus BLEU (sacrebleu, its default 13a tokenization) of the split's translations."""
    import sacrebleu

    sources, references = self.pairs(split)
    hypotheses = self.translate(params, sources)
    score = sacrebleu.corpus_bleu(hypotheses, [references])
    return {"bleu": float(score.score), "beam_size": self.cfg.task.beam_size, "hypotheses": hypotheses}

  def final_evaluation(self, params, step: int, last_eval) -> dict:
    """Loss and perplexity of the whole evaluation split, and its BLEU (beam search)."""
    out = {**super().final_evaluation(params, step, last_eval), **self.bleu(params, self.cfg.data.eval_split)}
    out.pop("hypotheses")
    return out
