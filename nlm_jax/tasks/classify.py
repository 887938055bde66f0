"""Text classification (sentiment: SST-2) with a head on any of the four language models.

    cfg = load_config(None, ["task.kind=classify", "model.arch=lstm", "data.files.train=train.tsv",
                             "data.files.validation=dev.tsv", "tokenizer.kind=word", "workdir=runs/sst2"])

The network is the language model (the *body*, unchanged, so a pretrained LM's parameters load
into it: `train.init_from`) without its output layer (the next-token softmax, unused here) and a
linear head on its final hidden states h_t:

    pooled = h_{last}                 (pooling 'last': the last non-pad token; a causal model has
                                       read the whole text there)
           | Σ_t m_t h_t / Σ_t m_t    (pooling 'mean': over the text's tokens)
           | max_{t: m_t=1} h_t       (pooling 'max': per feature, over the text's tokens)
           | [last; mean; max]        (pooling 'concat': ULMFiT's concat pooling, 3·D features)
    logits = W · dropout(pooled) + b  (C classes)

With task.word_dropout = p, training reads each word of a text as `<unk>` with probability p
(word dropout, Iyyer et al. 2015, with the unknown word standing in for the dropped one as in
Bowman et al. 2016): the start and end tokens and the padding are never dropped, and evaluation
reads the text as it is.

With task.backward, a second body of the same architecture reads each text right to left (last
word first; `train.init_backward_from`: a language model trained with data.reverse=true) and the
head reads both pooled states, [forward; backward] (2 × the features).

With finetune.lm_weight = λ > 0 (GPT-1's auxiliary objective, Radford et al. 2018), the bodies keep
their output layers and training minimizes the classification NLL + λ × each text's mean
next-token NLL under each body (`text_lm_nll`; the backward body's over the reversed text): the
words predicted are the text's own, before word dropout. Evaluation scores the classes only.

With task.teachers = [run, ...] (knowledge distillation, Hinton et al. 2015; an ensemble's
teachers: Buciluǎ et al. 2006), the teachers' class probabilities on every training example,
softened to the temperature T (p^(1/T), renormalized) and averaged over them, are soft targets q:
training minimizes (1 − α)·NLL(label) + α·T²·KL(q ‖ softmax(logits / T)) per text (α:
task.distill_weight, T: task.distill_temperature). The teachers are classification runs of the same
classes that read the same training split (each through its own tokenizer and network); their
targets are computed once, when training starts, from their last checkpoints, and recorded in the
run's data fingerprint (a resume with other teachers is refused like one with other data).
With task.transfer_copies = k, training also reads a *transfer set* (Tang et al. 2019, who distil
BERT into a BiLSTM on SST-2 this way): k copies of each training text, each word of a copy replaced
by <unk> with probability task.transfer_mask (and one word at least), drawn once from the run's
seed. A copy has no label (masking may remove what the label rests on): its loss is α·T²·KL(teachers'
targets on the copy ‖ model) alone. The teachers are unsure of such texts, so their targets there
say more than the labels do. Masking needs word tokenizers (the run's and the teachers').

With task.prefix_lm (a Transformer), the text is read as a prefix LM's prefix: every token attends
to every token of the text (not to the padding), as in an encoder; the pretrained causal LM's
parameters load the same.

Each text is tokenized as [start] + tokenizer.encode(text) (the word tokenizer ends it with
<eos>), cut to task.max_len tokens. Training batches hold texts of similar length (each epoch:
shuffle, sort chunks of 32 batches by length, shuffle the batches) padded to a multiple of 16
tokens, so a handful of shapes is compiled; the mask marks the padding. Evaluation reads a split
in order; rows that pad the last batch have weight 0.

Data: a GLUE-style TSV per split (`data.files`: a header, then `sentence<TAB>label`; the columns
are task.text_field / task.label_field), or a TFDS dataset (`data.source=tfds`, e.g.
`data.name=glue/sst2`) with those features. The classes are the training split's labels, sorted
(numerically when they are all integers); a run directory keeps them in labels.json.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from nlm_jax import config as config_lib
from nlm_jax import models, objectives
from nlm_jax.data import tokenizers
from nlm_jax.data.corpus import tfds_fields
from nlm_jax.data.files import read_text
from nlm_jax.errors import UserError
from nlm_jax.models.layers import param_init
from nlm_jax.tasks import finetune
from nlm_jax.tasks.common import ExamplesRun, check_task_model, padded_length
from nlm_jax.training import optim
from nlm_jax.training.steps import LMTask, config_options

Array = jax.Array
LABELS_FILE = "labels.json"
SOFT_TARGETS = "the teachers' soft targets (task.teachers)"  # their data-fingerprint entry
TRANSFER = "<train+transfer>"  # the examples training reads with task.transfer_copies: the split, then the copies
TEXTS = "<texts>"  # `text_probabilities`' texts, while they are read
MASK = "<unk>"  # a masked word of a transfer copy: a word tokenizer's unknown word


# ----------------------------------------------------------------------------- data


def read_tsv(path: str, text_field: str, label_field: str) -> tuple[list[str], list[str]]:
  """(texts, labels) of a TSV file with a header row naming its columns."""
  text = read_text(path)
  if not text.strip():
    raise UserError(f"data file {path} is empty")
  # lines end at "\n" (and "\r\n") only: str.splitlines would also split a text at U+2028, \x85, ...
  reader = csv.reader([line.removesuffix("\r") for line in text.split("\n")], delimiter="\t",
                      quoting=csv.QUOTE_NONE)
  header = next(reader)
  for field, key in ((text_field, "task.text_field"), (label_field, "task.label_field")):
    if field not in header:
      raise UserError(f"{path}: no column {field!r} in its header ({', '.join(map(repr, header))}); set {key}")
  i_text, i_label = header.index(text_field), header.index(label_field)
  texts, labels = [], []
  for line_no, row in enumerate(reader, start=2):
    if not row:
      continue
    if len(row) != len(header):
      raise UserError(f"{path}:{line_no}: {len(row)} tab-separated fields, the header has {len(header)}")
    if not row[i_label].strip():
      raise UserError(f"{path}:{line_no}: the label ({label_field!r}) is empty")
    texts.append(row[i_text])
    labels.append(row[i_label].strip())
  if not texts:
    raise UserError(f"data file {path} has a header but no examples")
  return texts, labels


def read_tfds(data_cfg, split: str, text_field: str, label_field: str) -> tuple[list[str], list[str]]:
  """(texts, labels) of a TFDS split (e.g. glue/sst2: features 'sentence' and 'label')."""
  texts, labels = tfds_fields(data_cfg, split, [text_field, label_field],
                              {text_field: "task.text_field", label_field: "task.label_field"})
  labels = [str(int(label)) for label in labels]
  if labels and all(label == "-1" for label in labels):
    raise UserError(f"the {split!r} split of {data_cfg.name!r} has no labels (-1: a hidden test split)")
  return [str(t) for t in texts], labels


def sort_labels(labels) -> list[str]:
  """The class names in order: numerically when all are integers, else as strings."""
  distinct = set(labels)
  try:
    return sorted(distinct, key=int)
  except ValueError:
    return sorted(distinct)


def encode_texts(tokenizer, texts: list[str], max_len: int) -> list[np.ndarray]:
  """[start] + tokenizer.encode(text), cut to max_len tokens, for each text."""
  start = np.asarray([tokenizer.start_id], np.int32)
  return [np.concatenate([start, tokenizer.encode(t.replace("\n", " "))])[:max_len].astype(np.int32)
          for t in texts]


def collate(ids: list[np.ndarray], labels: np.ndarray, rows: int, max_len: int) -> dict[str, np.ndarray]:
  """A batch of `rows` examples: the given ones (right-padded to a multiple of BUCKET tokens, at
  most max_len), then weight-0 rows of one token."""
  T = padded_length(max((len(x) for x in ids), default=1), max_len)
  inputs = np.zeros((rows, T), np.int32)
  mask = np.zeros((rows, T), np.float32)
  for b, x in enumerate(ids):
    inputs[b, :len(x)] = x
    mask[b, :len(x)] = 1.0
  mask[len(ids):, 0] = 1.0  # padding rows: one (ignored) token, so that every pooling is defined
  out_labels = np.zeros((rows,), np.int32)
  out_labels[:len(ids)] = labels
  weights = (np.arange(rows) < len(ids)).astype(np.float32)
  return {"inputs": inputs, "mask": mask, "labels": out_labels, "weights": weights}


def mask_copies(texts: list[str], copies: int, rate: float, seed: int) -> list[str]:
  """`copies` copies of each text, all texts' first copies, then their second ones, ...: in each,
  one word (whitespace-separated) chosen uniformly and each other word with probability `rate` is
  replaced by MASK (a text without words stays empty). The same texts, copies, rate and seed give
  the same copies."""
  rng, out = np.random.default_rng([seed, 0x7472616E73666572]), []  # 'transfer'
  for _ in range(copies):
    for text in texts:
      words = text.split()
      if words:
        masked = rng.random(len(words)) < rate
        masked[rng.integers(len(words))] = True
        words = [MASK if m else w for w, m in zip(words, masked)]
      out.append(" ".join(words))
  return out


def mismatch(run, labels: list[str], split: str, raw: tuple) -> Optional[str]:
  """Why a run cannot be scored beside (or teach) classifiers of `labels` reading `raw` as their
  `split` split, or None: it is no classifier, has other classes, or reads another split."""
  if run.cfg.task.kind != "classify":
    return f"is a task.kind={run.cfg.task.kind} run, not a classifier"
  if run.labels != labels:
    return f"has the classes {run.labels}, not {labels}"
  if run.raw(split) != raw:
    return f"reads another {split!r} split (its data.files, data.tfds or data.max_examples differ)"
  return None


# ----------------------------------------------------------------------------- model


POOLINGS = config_lib.CHOICES["task.pooling"]  # last, mean, max, concat


def pool(h_BxTxD: Array, mask_BxT: Array, pooling: str) -> Array:
  """The text's representation from its hidden states (right-padded; mask 1 on its tokens):
  'last' (the last token: a causal model has read the whole text there), 'mean', 'max' (per
  feature), or 'concat' = [last; mean; max] (ULMFiT, Howard & Ruder 2018). Padding never counts."""
  if pooling not in POOLINGS:
    raise ValueError(f"pooling {pooling!r}: not one of {', '.join(POOLINGS)}")
  m_BxTx1 = mask_BxT[..., None]
  last_B = jnp.maximum(mask_BxT.sum(1).astype(jnp.int32) - 1, 0)
  parts = {
      "last": lambda: jnp.take_along_axis(h_BxTxD, last_B[:, None, None], axis=1)[:, 0],
      "mean": lambda: (h_BxTxD * m_BxTx1).sum(1) / jnp.maximum(mask_BxT.sum(1), 1.0)[:, None],
      "max": lambda: jnp.where(m_BxTx1 > 0, h_BxTxD, -jnp.inf).max(1),
  }
  if pooling == "concat":
    return jnp.concatenate([parts[k]() for k in ("last", "mean", "max")], axis=-1)
  return parts[pooling]()


def drop_words(key: Array, tokens_BxT: Array, mask_BxT: Array, rate: float, unk_id: int,
               keep_ids: tuple[int, ...] = ()) -> Array:
  """Word dropout: each token of a text (mask 1) becomes `unk_id` with probability `rate`, except
  the tokens in `keep_ids` (the start and end markers)."""
  drop_BxT = jax.random.bernoulli(key, rate, tokens_BxT.shape) & (mask_BxT > 0)
  for i in keep_ids:
    drop_BxT &= tokens_BxT != i
  return jnp.where(drop_BxT, jnp.asarray(unk_id, tokens_BxT.dtype), tokens_BxT)


def text_lm_nll(logits_BxTxV: Array, tokens_BxT: Array, mask_BxT: Array, weights_B: Array) -> Array:
  """Σ_b weights_b · (1/(n_b − 1)) Σ_{t < n_b − 1} −log p(token_{b,t+1} | tokens_{b,≤t}): each text's
  mean next-token NLL (n_b: its length, mask 1), summed over the batch's texts."""
  nll_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV[:, :-1].astype(jnp.float32), tokens_BxT[:, 1:])
  w_BxT = mask_BxT[:, 1:].astype(jnp.float32)
  per_text_B = (nll_BxT * w_BxT).sum(1) / jnp.maximum(w_BxT.sum(1), 1.0)
  return (per_text_B * weights_B).sum()


def reverse_texts(tokens_BxT: Array, mask_BxT: Array) -> Array:
  """Each row's text (its mask-1 tokens, right-padded) last token first; the padding stays where
  it was: row b's token t becomes its token n_b − 1 − t for t < n_b (n_b: the text's length)."""
  T = tokens_BxT.shape[1]
  src_BxT = mask_BxT.sum(1).astype(jnp.int32)[:, None] - 1 - jnp.arange(T, dtype=jnp.int32)[None]
  reversed_BxT = jnp.take_along_axis(tokens_BxT, jnp.clip(src_BxT, 0, T - 1), axis=1)
  return jnp.where(src_BxT >= 0, reversed_BxT, tokens_BxT)


class Classifier(nn.Module):
  """A language model (`body`) with a linear head (`head`) on its pooled final hidden states; with
  `backward`, a second one (`body_backward`) reads each text right to left (`reverse_texts`) and
  the head reads [forward pooled; backward pooled] (ELMo, Peters et al. 2018; ULMFiT's forward and
  backward models, Howard & Ruder 2018, here one network)."""

  body_cfg: models.ModelConfig
  num_classes: int
  pooling: str = "last"
  head_dropout: float = 0.0
  bidirectional: bool = False  # a Transformer body: every token of the text sees all of it (a prefix LM)
  backward: bool = False  # a second body reads the text right to left
  lm_outputs: bool = False  # the bodies keep their output layers; their next-token logits are sown
  #   (collection 'lm_logits', as '<body>_logits') for finetune.lm_weight's auxiliary loss

  @nn.compact
  def __call__(self, tokens_BxT: Array, mask_BxT: Optional[Array] = None, *, deterministic: bool = True) -> Array:
    if mask_BxT is None:
      mask_BxT = jnp.ones(tokens_BxT.shape, jnp.float32)
    # the whole text is the prefix: its tokens see each other, none sees the padding after it
    extra = {"prefix_B": mask_BxT.sum(1).astype(jnp.int32)} if self.bidirectional else {}
    mask_BxT = mask_BxT.astype(jnp.float32)

    def read(name: str, tokens_BxT: Array) -> Array:
      body = models.build(self.body_cfg, name=name)
      # Without lm_outputs the language model's output layer is neither computed nor kept (at 2,048
      # wide and 40,000 words it would be half the classifier's parameters, and their optimizer state)
      out = body(tokens_BxT, None, deterministic=deterministic, logits=self.lm_outputs, **extra)
      if self.lm_outputs:
        self.sow("lm_logits", f"{name}_logits", out.logits)
      return pool(out.hidden.astype(jnp.float32), mask_BxT, self.pooling)

    pooled_BxD = read("body", tokens_BxT)
    if self.backward:
      pooled_BxD = jnp.concatenate([pooled_BxD, read("body_backward", reverse_texts(tokens_BxT, mask_BxT))], -1)
    pooled_BxD = nn.Dropout(self.head_dropout)(pooled_BxD, deterministic=deterministic)
    return nn.Dense(self.num_classes, kernel_init=param_init(nn.initializers.xavier_uniform(), (None, None)),
                    bias_init=param_init(nn.initializers.zeros, (None,)), name="head")(pooled_BxD)


class ClassifyTask(LMTask):
  """The train / eval steps of classification (the state, update and checks are LMTask's)."""

  batch_keys = ("inputs", "mask", "labels", "weights")

  def __init__(self, *args, smoothing: float = 0.0, word_dropout: float = 0.0, unk_id: Optional[int] = None,
               keep_ids: tuple[int, ...] = (), lm_weight: float = 0.0, distill: Optional[tuple[float, float]] = None,
               **kwargs):
    self.smoothing, self.lm_weight = smoothing, lm_weight
    self.distill = distill  # (α, T): batches carry the teachers' soft targets, 'soft' (B, C), and
    if distill is not None:  # which rows have a label, 'labelled' (B,): 0 on transfer copies and padding
      self.batch_keys = ClassifyTask.batch_keys + ("soft", "labelled")
    self.word_dropout, self.unk_id, self.keep_ids = word_dropout, unk_id, keep_ids
    super().__init__(*args, **kwargs)

  def _logits(self, params, batch, key, deterministic: bool) -> Array:
    """The class logits (B, C) of a batch."""
    return self._outputs(params, batch, key, deterministic)[0]

  def _outputs(self, params, batch, key, deterministic: bool):
    """(class logits, {body name: its next-token logits (B, T, V)}: none unless the bodies keep
    their output layers, finetune.lm_weight)."""
    inputs_BxT, rngs = batch["inputs"], None
    if not deterministic:
      if self.word_dropout:
        key, word_key = jax.random.split(key)
        inputs_BxT = drop_words(word_key, inputs_BxT, batch["mask"], self.word_dropout, self.unk_id, self.keep_ids)
      rngs = {"dropout": key}
    logits_BxC, sown = self.model.apply({"params": params}, inputs_BxT, batch["mask"], deterministic=deterministic,
                                        rngs=rngs, mutable=["lm_logits"])
    return logits_BxC, {k.removesuffix("_logits"): v[0] for k, v in sown.get("lm_logits", {}).items()}

  def _objective(self, params, batch, carry, key, deterministic: bool):
    """Σ over the batch's texts of the classification NLL, + λ × each text's mean next-token NLL
    under every body (finetune.lm_weight = λ; the backward body's over the reversed text). The
    words the language model predicts are the text's own, before word dropout. With teachers
    (distill = (α, T)) the classification NLL is (1 − α)·NLL + α·T²·KL(soft targets ‖ model at T),
    and a text without a label (a transfer copy) has the second term only; the loss is the mean
    over all texts."""
    logits_BxC, lm_logits = self._outputs(params, batch, key, deterministic)
    labelled_B = batch["labelled"] if self.distill is not None else batch["weights"]
    loss_sum, count = objectives.classification_nll(logits_BxC, batch["labels"], labelled_B, self.smoothing)
    correct, _ = objectives.accuracy(logits_BxC, batch["labels"], labelled_B)
    extra = {"correct": correct}
    if lm_logits or self.distill is not None:
      extra["class_nll_sum"] = loss_sum
    if self.distill is not None:
      alpha, temperature = self.distill
      extra["labelled"] = count
      extra["distill_kl_sum"], count = objectives.distillation_kl(logits_BxC, batch["soft"], temperature,
                                                                  batch["weights"])
      loss_sum = (1.0 - alpha) * loss_sum + alpha * extra["distill_kl_sum"]
    for name, logits_BxTxV in lm_logits.items():
      tokens_BxT = batch["inputs"] if name == "body" else reverse_texts(batch["inputs"], batch["mask"])
      extra[f"{name}_lm_nll_sum"] = text_lm_nll(logits_BxTxV, tokens_BxT, batch["mask"], batch["weights"])
      loss_sum = loss_sum + self.lm_weight * extra[f"{name}_lm_nll_sum"]
    return loss_sum, count, None, extra

  def train_scores(self, metrics: list[dict]) -> dict:
    """train_accuracy of the micro-batches since the last log; with finetune.lm_weight also the two
    parts of train_loss: train_class_loss (the classification loss, smoothed as trained) and, per body, its mean
    next-token NLL per text (train_lm_loss, train_lm_loss_backward); with task.teachers the
    classification loss and train_distill_kl (T² · the KL from the teachers' soft targets). The
    accuracy and classification loss are over the texts with a label (not the transfer copies)."""
    count = sum(float(m["count"]) for m in metrics)
    labelled = sum(float(m["labelled"]) for m in metrics) if "labelled" in metrics[0] else count
    out = {"train_accuracy": sum(float(m["correct"]) for m in metrics) / max(labelled, 1.0)}
    for key, name, n in (("class_nll_sum", "train_class_loss", labelled), ("body_lm_nll_sum", "train_lm_loss", count),
                         ("body_backward_lm_nll_sum", "train_lm_loss_backward", count),
                         ("distill_kl_sum", "train_distill_kl", count)):
      if key in metrics[0]:
        out[name] = sum(float(m[key]) for m in metrics) / max(n, 1.0)
    return out

  def _eval_metrics(self, params, carry, batch):
    logits_BxC = self._logits(params, batch, None, deterministic=True)
    nll_sum, count = objectives.classification_nll(logits_BxC, batch["labels"], batch["weights"])
    correct, _ = objectives.accuracy(logits_BxC, batch["labels"], batch["weights"])
    onehot_BxC = jax.nn.one_hot(batch["labels"], logits_BxC.shape[-1]) * batch["weights"][:, None]
    right_B = (jnp.argmax(logits_BxC, -1) == batch["labels"]).astype(jnp.float32)
    return None, {"nll_sum": nll_sum, "count": count, "correct": correct,
                  "total_C": onehot_BxC.sum(0), "correct_C": (onehot_BxC * right_B[:, None]).sum(0)}

  def predict(self, params, inputs_BxT, mask_BxT) -> Array:
    return jax.nn.softmax(self.model.apply({"params": params}, inputs_BxT, mask_BxT, deterministic=True), -1)


# ----------------------------------------------------------------------------- the run


class ClassifyRun(ExamplesRun):
  """What the trainer needs for a classification run (the interface of `trainer.Run`)."""

  body = "body"
  backward_body = "body_backward"  # task.backward's: train.init_backward_from fills it

  def __init__(self, cfg: config_lib.Config, tokenizer=None, mesh=None, workdir: Optional[str] = None):
    self._setup(cfg, mesh)
    t, d = cfg.task, cfg.data
    self._splits: dict[str, tuple[list[np.ndarray], np.ndarray]] = {}
    saved = os.path.join(workdir, LABELS_FILE) if workdir else None
    if saved and os.path.exists(saved):
      try:
        with open(saved, encoding="utf-8") as f:
          self.labels = json.load(f)["labels"]
        if not (isinstance(self.labels, list) and all(isinstance(x, (str, int)) for x in self.labels)):
          raise ValueError
      except (OSError, ValueError, KeyError, TypeError) as e:  # UnicodeDecodeError is a ValueError
        raise UserError(f"{saved} is damaged ({type(e).__name__}: not this run's list of class names); "
                        "restore it from a copy of the run") from None
    else:
      self.labels = sort_labels(self.raw(d.train_split)[1])
    if len(self.labels) < 2:
      raise UserError(f"the {d.train_split!r} split has one label ({self.labels[0]!r}); classification "
                      "needs at least two")
    self.tokenizer = tokenizer or tokenizers.train_tokenizer(cfg.tokenizer, "\n".join(self.raw(d.train_split)[0]))
    self.model_cfg = config_lib.model_config(cfg, self.tokenizer.vocab_size)
    check_task_model(t, self.model_cfg)
    self.model = Classifier(self.model_cfg, len(self.labels), t.pooling, t.head_dropout, t.prefix_lm, t.backward,
                            lm_outputs=cfg.finetune.lm_weight > 0)
    unk_id = getattr(self.tokenizer, "unk_id", None)
    if t.transfer_copies and self.tokenizer.kind != "word":
      raise UserError(f"task.transfer_copies masks words as {MASK}, which needs tokenizer.kind=word; this run's "
                      f"tokenizer is {self.tokenizer.kind}")
    if t.word_dropout and unk_id is None:
      raise UserError(f"task.word_dropout needs a tokenizer with an unknown-word token (word, sentencepiece); "
                      f"tokenizer.kind={self.tokenizer.kind} has none")
    keep_ids = tuple(sorted({self.tokenizer.start_id, getattr(self.tokenizer, "eos_id", self.tokenizer.start_id)}))
    frozen = finetune.freeze(cfg, head="head")
    self.tx = optim.make_optimizer(cfg.optim, cfg.train.steps, finetune.lr_groups(cfg, self.model_cfg, head="head"),
                                   frozen)
    self.task = ClassifyTask(self.model, self.tx, optim.plateau(cfg.optim), self.mesh, d.batch_size, False,
                             example_len=min(8, t.max_len), **config_options(cfg), freeze=frozen,
                             smoothing=t.label_smoothing, word_dropout=t.word_dropout, unk_id=unk_id, keep_ids=keep_ids,
                             lm_weight=cfg.finetune.lm_weight,
                             distill=(t.distill_weight, t.distill_temperature) if t.teachers else None)

  def retired_params(self, names: tuple[str, ...]) -> bool:
    """Whether a parameter is one classifiers no longer keep: the language model's output layer
    in a body (kept, unused, before 2026-11-27), so that a checkpoint of then still resumes."""
    return len(names) > 1 and names[0] in (self.body, self.backward_body) and names[1] in self._output_groups

  @functools.cached_property
  def _output_groups(self) -> set[str]:
    """The top-level parameter groups a language model has and a classifier's body lacks."""
    lm, tokens = models.build(self.model_cfg), jnp.zeros((1, 2), jnp.int32)
    full, body = (set(jax.eval_shape(lambda: lm.init(jax.random.key(0), tokens, logits=x))["params"])
                  for x in (True, False))
    return full - body

  # ------------------------------------------------------------------------- data

  def read_file(self, path: str) -> tuple[list[str], list[str]]:
    return read_tsv(path, self.cfg.task.text_field, self.cfg.task.label_field)

  def read_tfds(self, split: str) -> tuple[list[str], list[str]]:
    return read_tfds(self.cfg.data, split, self.cfg.task.text_field, self.cfg.task.label_field)

  def train_source(self) -> str:
    """What training reads: the training split, and with task.transfer_copies its copies (TRANSFER)."""
    return TRANSFER if self.cfg.task.transfer_copies else self.cfg.data.train_split

  def transfer_texts(self) -> list[str]:
    """The transfer set: task.transfer_copies masked copies of each training text (`mask_copies`;
    drawn once: training's examples and the teachers' targets read the same list)."""
    if "_transfer" not in self.__dict__:
      t = self.cfg.task
      self._transfer = mask_copies(self.raw(self.cfg.data.train_split)[0], t.transfer_copies, t.transfer_mask,
                                   self.cfg.seed)
    return self._transfer

  def examples(self, split: str) -> tuple[list[np.ndarray], np.ndarray]:
    """(token ids of each text, class index of each label) of a split; TRANSFER: the training
    split's, then its transfer copies' (class 0: they have none, see `collate`'s 'labelled')."""
    if split == TRANSFER and split not in self._splits:
      ids, labels = self.examples(self.cfg.data.train_split)
      copies = encode_texts(self.tokenizer, self.transfer_texts(), self.cfg.task.max_len)
      self._splits[split] = ids + copies, np.concatenate([labels, np.zeros(len(copies), np.int32)])
    if split not in self._splits:
      texts, labels = self.raw(split)
      index = {label: i for i, label in enumerate(self.labels)}
      unknown = sorted(set(labels) - set(index))
      if unknown:
        raise UserError(f"the {split!r} split has label {unknown[0]!r}, which the training split does not "
                        f"have (classes: {', '.join(self.labels)})")
      ids = encode_texts(self.tokenizer, texts, self.cfg.task.max_len)
      self._splits[split] = ids, np.asarray([index[label] for label in labels], np.int32)
    return self._splits[split]

  def save_files(self, workdir: str) -> None:
    with open(os.path.join(workdir, LABELS_FILE), "w") as f:
      json.dump({"labels": self.labels}, f)

  def collate(self, indices: list[int], split: str, rows: int) -> dict[str, np.ndarray]:
    ids, labels = self.examples(split)
    batch = collate([ids[i] for i in indices], labels[indices], rows, self.cfg.task.max_len)
    if self.cfg.task.teachers:  # every batch has the keys; only training reads them (other splits: zeros)
      batch["soft"] = np.zeros((rows, len(self.labels)), np.float32)
      if split in (self.cfg.data.train_split, TRANSFER):
        batch["soft"][:len(indices)] = self.soft_targets()[indices]
      batch["labelled"] = batch["weights"].copy()
      if split == TRANSFER:  # a transfer copy (an index past the training split's) has no label
        batch["labelled"][:len(indices)] *= np.asarray(indices) < len(self.raw(self.cfg.data.train_split)[0])
    return batch

  def soft_targets(self) -> np.ndarray:
    """The teachers' (task.teachers) class distributions (N, C) on the training split (and after it
    on its transfer copies, `transfer_texts`), at temperature T: each teacher's probabilities
    p^(1/T) renormalized, averaged over them (cached)."""
    if "_soft" not in self.__dict__:
      from nlm_jax.training import trainer

      t, split = self.cfg.task, self.cfg.data.train_split
      copies = self.transfer_texts() if t.transfer_copies else []
      total = None
      for path in t.teachers:
        if os.path.abspath(os.path.expanduser(path)) == os.path.abspath(os.path.expanduser(self.cfg.workdir)):
          raise UserError(f"task.teachers: {path} is this run's own workdir; a run cannot be its own teacher")
        run, params, _ = trainer.load_run(path, mesh=self.mesh)
        why = mismatch(run, self.labels, split, self.raw(split))
        if why:
          raise UserError(f"task.teachers: {path} {why}, unlike this run")
        if copies and run.tokenizer.kind != "word":
          raise UserError(f"task.teachers: {path} reads text with a {run.tokenizer.kind} tokenizer; the masked words "
                          f"({MASK}) of task.transfer_copies need word tokenizers")
        p_NxC = run.split_probabilities(params, split, by_length=True)
        if copies:
          p_NxC = np.concatenate([p_NxC, run.text_probabilities(params, copies)])
        p_NxC = p_NxC.astype(np.float64)
        log_p = np.log(np.maximum(p_NxC, np.finfo(np.float64).tiny))
        q = np.exp((log_p - log_p.max(1, keepdims=True)) / t.distill_temperature)
        q /= q.sum(1, keepdims=True)
        total = q if total is None else total + q
      self._soft = (total / len(t.teachers)).astype(np.float32)
    return self._soft

  def data_fingerprint(self, splits: Optional[list[str]] = None) -> dict[str, str]:
    """The splits' fingerprints; when training from task.teachers also their soft targets'."""
    out = super().data_fingerprint(splits)
    if self.cfg.task.teachers and splits is None:
      out[SOFT_TARGETS] = hashlib.sha256(np.ascontiguousarray(self.soft_targets()).tobytes()).hexdigest()[:16]
    return out

  def evaluate(self, params, split: str, max_batches: Optional[int], seed: int = 0, batching=None) -> dict:
    """Loss (mean NLL), accuracy, and per class the examples and the correct ones, over a split
    (all of it, or its first `max_batches` batches)."""
    sums = self.eval_sums(params, split, max_batches)
    count = float(sums["count"])
    per_class = {label: {"examples": int(t), "correct": int(c)}
                 for label, t, c in zip(self.labels, sums["total_C"], sums["correct_C"])}
    return {"loss": float(sums["nll_sum"]) / count, "accuracy": float(sums["correct"]) / count,
            "examples": int(count), "per_class": per_class}

  def val_scores(self, val: dict) -> dict:
    return {"val_loss": val["loss"], "val_accuracy": val["accuracy"]}

  def predict(self, params, texts: list[str]) -> np.ndarray:
    """Class probabilities (N, C) of texts."""
    ids = encode_texts(self.tokenizer, texts, self.cfg.task.max_len)
    batch = collate(ids, np.zeros(len(ids), np.int32), len(ids), self.cfg.task.max_len)
    return np.asarray(jax.jit(self.task.predict)(params, batch["inputs"], batch["mask"]))

  def text_probabilities(self, params, texts: list[str]) -> np.ndarray:
    """Class probabilities (N, C) of texts, read as a split's examples (in batches of similar length)."""
    self._splits[TEXTS] = encode_texts(self.tokenizer, texts, self.cfg.task.max_len), np.zeros(len(texts), np.int32)
    try:
      return self.split_probabilities(params, TEXTS, by_length=True)
    finally:
      del self._splits[TEXTS]

  def split_probabilities(self, params, split: str, by_length: bool = False) -> np.ndarray:
    """Class probabilities (N, C) of every example of a split, in the split's order (the batches
    `evaluate` reads; `by_length`: computed in batches of similar length, less padding to read)."""
    order = np.argsort([len(x) for x in self.examples(split)[0]], kind="stable") if by_length else None
    predict, out = jax.jit(self.task.predict), []
    for batch, n in self.eval_batches(split, order=order):
      probs_BxC = predict(params, batch["inputs"], batch["mask"])
      out.append(np.asarray(multihost_utils.process_allgather(probs_BxC, tiled=True))[:n])
    probs = np.concatenate(out) if out else np.zeros((0, len(self.labels)), np.float32)
    if order is not None:  # row k is example order[k]'s
      probs[order] = probs.copy()
    return probs


def ensemble(members: list, split: str) -> dict:
  """Soft voting over classification runs: each example's class probabilities averaged over the
  `members` [(name, ClassifyRun, params), ...], which must have the same classes and read the
  same examples for `split` (each through its own tokenizer). Loss (mean −log p̄(y)), accuracy and
  per-class counts of the average, and each member's loss and accuracy."""
  for name, run, _ in members:
    if run.cfg.task.kind != "classify":
      raise UserError(f"{name} is a task.kind={run.cfg.task.kind} run; an ensemble needs classification runs")
  (first, run0, _), probs, scores = members[0], [], []
  for name, run, params in members:
    why = mismatch(run, run0.labels, split, run0.raw(split))
    if why:
      raise UserError(f"{name} {why}, unlike {first}: not one ensemble")
    p_NxC = run.split_probabilities(params, split)
    probs.append(p_NxC)
    scores.append({"workdir": name, **_scores(p_NxC, run.examples(split)[1], run.labels)})
  result = _scores(np.mean(probs, 0), run0.examples(split)[1], run0.labels)
  return {"runs": len(members), **result, "members": scores}


def _scores(p_NxC: np.ndarray, y_N: np.ndarray, labels: list[str]) -> dict:
  right_N = p_NxC.argmax(1) == y_N
  p_y = np.take_along_axis(p_NxC, y_N[:, None], 1)[:, 0].astype(np.float64)
  per_class = {label: {"examples": int((y_N == c).sum()), "correct": int(right_N[y_N == c].sum())}
               for c, label in enumerate(labels)}
  return {"loss": float(-np.log(np.maximum(p_y, np.finfo(np.float64).tiny)).mean()),
          "accuracy": float(right_N.mean()), "examples": len(y_N), "per_class": per_class}
