"""The run configuration: typed dataclasses, YAML recipes and dotted command-line overrides.

OmegaConf checks keys and types: `train.stpes=10` or `train.steps=ten` fail with the key named.
The model section is checked against the dataclass of its `arch` (nlm_jax.models.CONFIGS).

    cfg = load_config("experiments/configs/shakespeare_char_transformer.yaml",
                      ["workdir=runs/x", "train.steps=100"])
"""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nlm_jax import models
from nlm_jax.errors import UserError


@dataclasses.dataclass
class DataConfig:
  source: str = "text"  # 'tfds' | 'text'
  # TFDS
  name: Optional[str] = None  # TFDS dataset name, e.g. tiny_shakespeare, lm1b, imdb_reviews
  data_dir: Optional[str] = None  # TFDS data_dir; None = ~/tensorflow_datasets
  text_feature: str = "text"  # TFDS feature holding the text
  max_examples: Optional[int] = None  # TFDS: examples read per split; None = all
  # local text: a file per split, or one file cut by fractions into train/validation[/test]
  files: Dict[str, str] = dataclasses.field(default_factory=dict)  # split name -> text file
  file: Optional[str] = None  # one text file, cut by split_fractions
  split_fractions: List[float] = dataclasses.field(default_factory=lambda: [0.9, 0.1])  # train, val[, test]
  train_split: str = "train"  # the split trained on (and the tokenizer fitted to)
  eval_split: str = "validation"  # the split of val_loss and the final evaluation
  # batching
  batching: str = "windows"  # 'windows' (random windows, nanoGPT) | 'streams' (truncated BPTT)
  batch_size: int = 12  # B: rows per optimizer micro-batch (global, over all devices)
  seq_len: int = 64  # T: tokens per row
  eval_batch_size: Optional[int] = None  # rows per evaluation batch; None = batch_size
  cache_dir: Optional[str] = None  # tokenized splits; None = $NLM_JAX_CACHE or ~/.cache/nlm-jax
  reverse: bool = False  # language models: read every split right to left (a backward LM: train.init_backward_from)

  @property
  def eval_rows(self) -> int:
    """Rows per evaluation batch: eval_batch_size, or batch_size where it is None."""
    return self.eval_batch_size or self.batch_size


@dataclasses.dataclass
class TokenizerConfig:
  kind: str = "char"  # 'char' | 'byte' | 'word' | 'sentencepiece'
  vocab_size: Optional[int] = None  # word: max vocabulary (None = all); sentencepiece: required
  min_count: int = 1  # word: drop rarer words to <unk>
  include: Optional[str] = None  # word: a text file all of whose words are in the vocabulary (a task's words)
  model_type: str = "bpe"  # sentencepiece: 'bpe' | 'unigram'
  character_coverage: float = 1.0  # sentencepiece: fraction of characters the vocabulary covers


@dataclasses.dataclass
class OptimConfig:
  name: str = "adamw"  # 'sgd' | 'momentum' | 'nesterov' | 'adam' | 'adamw'
  lr: float = 1e-3  # peak learning rate
  momentum: float = 0.9  # momentum / nesterov
  b1: float = 0.9  # Adam β₁
  b2: float = 0.999  # Adam β₂
  eps: float = 1e-8  # Adam ε
  weight_decay: float = 0.0  # λ: weight decay
  weight_decay_mode: Optional[str] = None  # 'decoupled' | 'l2'; None: decoupled for adamw, else l2
  decay_exclude: List[str] = dataclasses.field(default_factory=lambda: ["bias", "norm"])  # no decay; + 'embedding'
  clip_norm: Optional[float] = None  # global-norm clipping
  schedule: str = "constant"  # 'constant' | 'warmup_cosine' | 'plateau'
  warmup_steps: int = 0  # linear warm-up from 0 to lr (every schedule)
  decay_steps: Optional[int] = None  # cosine length; None = train.steps
  min_lr: float = 0.0  # the cosine ends here
  plateau_factor: float = 0.25  # 'plateau': lr *= factor when validation loss stops improving
  plateau_patience: int = 1  # evaluations without improvement before a decay
  grad_accum: int = 1  # micro-batches per optimizer step (optax.MultiSteps)
  ema_decay: Optional[float] = None  # Polyak averaging: evaluate, keep and fine-tune from the params' moving average (e.g. 0.999)


@dataclasses.dataclass
class TrainConfig:
  steps: int = 1000  # optimizer steps
  stop_after: Optional[int] = None  # stop (with a checkpoint) at this step; the schedule still uses steps
  log_every: int = 10  # steps between train_loss records (metrics.jsonl, TensorBoard, progress bar)
  eval_every: int = 250  # steps between evaluations (val_loss, eval_train_loss); the last step is always one
  eval_batches: Optional[int] = 20  # batches per evaluation and split (eval_iters); None = all of validation
  eval_estimator: str = "fixed"  # 'fixed' (same windows each time) | 'random_windows' (fresh, nanoGPT)
  eval_train_batches: Optional[int] = None  # for eval_train_loss; None = as many as validation's, 0 = none
  checkpoint_every: Optional[int] = None  # steps between checkpoints; None = eval_every
  keep_checkpoints: int = 2  # the last N, plus the best by validation loss
  init_from: Optional[str] = None  # run dir (its best checkpoint) or checkpoint dir: start from its params only
  init_backward_from: Optional[str] = None  # with task.backward: a backward LM (data.reverse) for the second body
  progress: bool = True  # progress bars on stderr
  deterministic: bool = True  # bitwise-reproducible steps on GPUs too (XLA deterministic ops; nlm_jax.runtime)
  allow_data_change: bool = False  # resume even if the data's fingerprint changed (a warning, not an error)
  allow_schedule_change: bool = False  # resume with another train.steps / optim.decay_steps (reshapes the schedule)


@dataclasses.dataclass
class TaskConfig:
  kind: str = "lm"  # 'lm' (next-token prediction) | 'classify' (a label per text) | 'translate'
  source_lang: str = "en"  # translate: the files' suffix (data.files.<split>.en) or TFDS feature of the source
  target_lang: str = "de"  # translate: ... of the target
  text_field: str = "sentence"  # classify: the column (TSV header) or TFDS feature holding the text
  label_field: str = "label"  # classify: the column or TFDS feature holding the label
  pooling: str = "last"  # classify: the head reads 'last' (last non-pad token), 'mean', 'max' or 'concat' (all three)
  max_len: int = 128  # classify, translate: tokens per example, longer ones are cut (at most model.context)
  label_smoothing: float = 0.0  # classify, translate: ε, the targets are (1 − ε)·one-hot + ε/C
  head_dropout: float = 0.0  # classify: dropout on the pooled state before the head
  word_dropout: float = 0.0  # classify: in training, each word of a text is read as <unk> with this probability
  prefix_lm: bool = False  # Transformer: translate's source / classify's text attends in both directions
  backward: bool = False  # classify: a second body reads the text right to left; the head reads both (ELMo)
  teachers: List[str] = dataclasses.field(default_factory=list)  # classify: runs (workdirs) whose averaged class
  #   probabilities on the training split are soft targets (knowledge distillation; their last checkpoints)
  distill_weight: float = 0.5  # classify, with teachers: α; the loss is (1 − α)·NLL + α·T²·KL(teachers ‖ model)
  distill_temperature: float = 1.0  # classify, with teachers: T, both distributions' softmax temperature
  transfer_copies: int = 0  # classify, with teachers: k masked copies of each training text, soft targets only
  transfer_mask: float = 0.1  # classify, with transfer_copies: each word of a copy is <unk> with this probability
  beam_size: int = 4  # translate: beams of the search (1 = greedy)
  length_penalty: float = 0.6  # translate: α of GNMT's ((5 + n)/6)^α (0 = none)
  max_decode_len: int = 64  # translate: most tokens a translation may have
  min_decode_len: int = 1  # translate: fewest tokens before the end (0: a translation may be empty)
  decode_batch_size: int = 64  # translate: sentences decoded at once


# The task.* keys and the task kinds that read them: set to anything but its default under
# another kind, a key is an error (it would be ignored).
TASK_KEYS = {
    "source_lang": ("translate",), "target_lang": ("translate",), "beam_size": ("translate",),
    "length_penalty": ("translate",), "max_decode_len": ("translate",), "min_decode_len": ("translate",),
    "decode_batch_size": ("translate",),
    "text_field": ("classify",), "label_field": ("classify",), "pooling": ("classify",),
    "head_dropout": ("classify",), "word_dropout": ("classify",), "backward": ("classify",),
    "teachers": ("classify",), "distill_weight": ("classify",), "distill_temperature": ("classify",),
    "transfer_copies": ("classify",), "transfer_mask": ("classify",),
    "max_len": ("classify", "translate"), "label_smoothing": ("classify", "translate"),
    "prefix_lm": ("classify", "translate"),
}


@dataclasses.dataclass
class FinetuneConfig:
  freeze_body_steps: int = 0  # with train.init_from: the body is not updated for the first k steps
  body_lr_scale: float = 1.0  # the body's learning rate is optim.lr × this; the new head's is optim.lr
  layer_lr_decay: Optional[float] = None  # ULMFiT: each body layer gets the one above's rate ÷ this (2.6)
  reinit: List[str] = dataclasses.field(default_factory=list)  # with train.init_from: body parameter groups
  #   ('embed', 'layer_0', ...) not loaded: they keep this run's fresh initialization
  lm_weight: float = 0.0  # classify: + λ × the body's next-token NLL of each text (GPT-1's auxiliary objective;
  #   the body keeps its language-model output layer, loaded by train.init_from)


@dataclasses.dataclass
class MeshConfig:
  data: int = -1  # data parallelism; −1 takes the devices the other axes leave
  fsdp: int = 1  # fully sharded data parallelism: batch and parameters split over it
  tensor: int = 1  # tensor parallelism: heads, MLP units, gates and vocabulary split over it
  activation_sharding: bool = True  # constrain activations to their logical axes' shardings; false: XLA decides


@dataclasses.dataclass
class DistributedConfig:
  initialize: bool = False  # call jax.distributed.initialize() (TPU pods, SLURM: no other keys needed)
  coordinator_address: Optional[str] = None  # host:port of process 0
  num_processes: Optional[int] = None  # how many processes take part
  process_id: Optional[int] = None  # this process: 0 .. num_processes − 1
  cpu_collectives: str = "gloo"  # CPU only: collectives across processes


@dataclasses.dataclass
class Config:
  workdir: str = MISSING  # the run directory (required)
  seed: int = 0  # initialization, data order, dropout
  init_seed: Optional[int] = None  # the network's initialization only (data order and dropout stay seed's);
  #   null: seed. Runs that differ only in seed then start from one network (a model soup's members)
  task: TaskConfig = dataclasses.field(default_factory=TaskConfig)  # what is learned: lm | classify | translate
  model: Dict[str, Any] = dataclasses.field(default_factory=dict)  # model.arch and the fields of its config
  data: DataConfig = dataclasses.field(default_factory=DataConfig)  # text source and batching
  tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)  # text -> ids
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)  # optimizer and schedule
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)  # the loop
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)  # device mesh
  distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)  # several processes
  finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)  # from train.init_from


CHOICES = {
    "task.kind": ("lm", "classify", "translate"),
    "task.pooling": ("last", "mean", "max", "concat"),
    "data.source": ("tfds", "text"),
    "data.batching": ("windows", "streams"),
    "tokenizer.kind": ("char", "byte", "word", "sentencepiece"),
    "tokenizer.model_type": ("bpe", "unigram"),
    "optim.name": ("sgd", "momentum", "nesterov", "adam", "adamw"),
    "optim.weight_decay_mode": (None, "decoupled", "l2"),
    "optim.schedule": ("constant", "warmup_cosine", "plateau"),
    "train.eval_estimator": ("fixed", "random_windows"),
}
POSITIVE = ("data.batch_size", "data.seq_len", "train.steps", "train.log_every", "train.eval_every",
            "train.keep_checkpoints", "optim.grad_accum")
# The range of every other number; a key whose value may be null is not checked when it is.
RANGES = {
    "seed": (0, None, "≥ 0"),
    "optim.lr": (0, None, "> 0", "open"),
    "optim.momentum": (0, 1, "in [0, 1)", "open-high"),
    "optim.b1": (0, 1, "in [0, 1)", "open-high"),
    "optim.b2": (0, 1, "in [0, 1)", "open-high"),
    "optim.eps": (0, None, "≥ 0"),
    "optim.weight_decay": (0, None, "≥ 0"),
    "optim.clip_norm": (0, None, "> 0 (or null: no clipping)", "open"),
    "optim.warmup_steps": (0, None, "≥ 0"),
    "optim.decay_steps": (1, None, "≥ 1 (or null: train.steps)"),
    "optim.min_lr": (0, None, "≥ 0"),
    "optim.plateau_factor": (0, 1, "in (0, 1]", "open-low"),
    "optim.plateau_patience": (0, None, "≥ 0"),
    "optim.ema_decay": (0, 1, "in [0, 1) (or null: off)", "open-high"),
    "train.stop_after": (1, None, "≥ 1 (or null: train.steps)"),
    "train.checkpoint_every": (1, None, "≥ 1 (or null: train.eval_every)"),
    "train.eval_batches": (1, None, "≥ 1 (or null: the whole split)"),
    "data.eval_batch_size": (1, None, "≥ 1 (or null: data.batch_size)"),
    "data.max_examples": (1, None, "≥ 1 (or null: all)"),
    "tokenizer.vocab_size": (1, None, "≥ 1"),
    "tokenizer.min_count": (1, None, "≥ 1"),
    "tokenizer.character_coverage": (0, 1, "in (0, 1]", "open-low"),
    "task.max_len": (1, None, "≥ 1"),
    "task.label_smoothing": (0, 1, "in [0, 1)", "open-high"),
    "task.head_dropout": (0, 1, "in [0, 1)", "open-high"),
    "task.word_dropout": (0, 1, "in [0, 1)", "open-high"),
    "task.distill_weight": (0, 1, "in [0, 1]"),
    "task.distill_temperature": (0, None, "> 0", "open"),
    "task.transfer_copies": (0, None, "≥ 0"),
    "task.transfer_mask": (0, 1, "in [0, 1]"),
    "task.beam_size": (1, None, "≥ 1"),
    "task.length_penalty": (0, None, "≥ 0"),
    "task.max_decode_len": (1, None, "≥ 1"),
    "task.min_decode_len": (0, None, "≥ 0"),
    "task.decode_batch_size": (1, None, "≥ 1"),
    "finetune.freeze_body_steps": (0, None, "≥ 0"),
    "finetune.body_lr_scale": (0, None, "≥ 0"),
    "finetune.layer_lr_decay": (1, None, "≥ 1 (or null: off)"),
    "finetune.lm_weight": (0, None, "≥ 0"),
    "distributed.num_processes": (1, None, "≥ 1"),
    "distributed.process_id": (0, None, "≥ 0"),
}
INT_LIMIT = 2**31 - 1  # steps and sizes are int32 on the device


def _check_numbers(cfg: "Config") -> None:
  """Every int and float setting is finite and within its range (RANGES, POSITIVE)."""
  import math

  def walk(obj, prefix):
    for f in dataclasses.fields(obj):
      value = getattr(obj, f.name)
      if dataclasses.is_dataclass(value):
        yield from walk(value, prefix + f.name + ".")
      elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield prefix + f.name, value

  for key, value in walk(cfg, ""):
    if isinstance(value, float) and not math.isfinite(value):
      raise UserError(f"config: {key}={value}; must be a finite number")
    if isinstance(value, int) and abs(value) > INT_LIMIT:
      raise UserError(f"config: {key}={value}; too large (at most {INT_LIMIT})")
    if key not in RANGES:
      continue
    low, high, what, *bounds = RANGES[key] + ("closed",)
    open_low = bounds[0] in ("open", "open-low")
    open_high = bounds[0] in ("open", "open-high")
    if ((value <= low) if open_low else (value < low)) or (
        high is not None and ((value >= high) if open_high else (value > high))):
      raise UserError(f"config: {key}={value}; must be {what}")


def _omegaconf_error(e: OmegaConfBaseException, where: str, prefix: str = "") -> UserError:
  first = str(e).splitlines()[0]
  key = getattr(e, "full_key", None)
  key = prefix + key if key else key
  return UserError(f"{where}: {first}" + (f" (key: {key})" if key and key not in first else ""))


def _get(cfg: Config, dotted: str):
  obj = cfg
  for part in dotted.split("."):
    obj = getattr(obj, part)
  return obj


def validate(cfg: Config) -> Config:
  """Checks the values OmegaConf's types cannot express; raises UserError naming the key."""
  for key, allowed in CHOICES.items():
    value = _get(cfg, key)
    if value not in allowed:
      raise UserError(f"config: {key}={value!r}; allowed: {', '.join(map(str, allowed))}")
  for key in POSITIVE:
    value = _get(cfg, key)
    if value <= 0:
      raise UserError(f"config: {key}={value}; must be positive")
  _check_numbers(cfg)
  if cfg.optim.name == "adamw" and cfg.optim.weight_decay_mode == "l2":
    raise UserError("config: optim.name=adamw has decoupled weight decay; use optim.name=adam "
                    "for optim.weight_decay_mode=l2")
  unknown = sorted(set(cfg.optim.decay_exclude) - {"bias", "norm", "embedding"})
  if unknown:
    raise UserError(f"config: optim.decay_exclude has {unknown[0]!r}; allowed: bias, norm, embedding")
  if cfg.data.reverse and cfg.task.kind != "lm":
    raise UserError(f"config: data.reverse=true is for language models, not task.kind={cfg.task.kind} (a classifier "
                    "also reads its text right to left with task.backward=true)")
  defaults = TaskConfig()
  for key, kinds in TASK_KEYS.items():
    value = getattr(cfg.task, key)
    if cfg.task.kind not in kinds and value != getattr(defaults, key):
      shown = str(value).lower() if isinstance(value, bool) else value
      raise UserError(f"config: task.{key}={shown} is for task.kind={' or '.join(kinds)}, not {cfg.task.kind} "
                      "(it would be ignored)")
  for key in ("distill_weight", "distill_temperature", "transfer_copies", "transfer_mask"):
    if not cfg.task.teachers and getattr(cfg.task, key) != getattr(defaults, key):
      raise UserError(f"config: task.{key} is for distillation from task.teachers, which is not set (it would be "
                      "ignored)")
  if cfg.task.transfer_mask != defaults.transfer_mask and not cfg.task.transfer_copies:
    raise UserError("config: task.transfer_mask is for task.transfer_copies ≥ 1, which is 0 (it would be ignored)")
  if cfg.train.eval_estimator == "random_windows" and cfg.task.kind != "lm":
    raise UserError(f"config: train.eval_estimator=random_windows is for task.kind=lm (windows of a text), not "
                    f"{cfg.task.kind}")
  if cfg.train.init_backward_from and not (cfg.task.backward and cfg.train.init_from):
    raise UserError("config: train.init_backward_from loads the backward body: it needs task.backward=true and "
                    "train.init_from (the forward language model)")
  if cfg.task.backward and cfg.train.init_from and not cfg.train.init_backward_from:
    raise UserError("config: task.backward=true with train.init_from needs train.init_backward_from, a language "
                    "model of the reversed text (data.reverse=true) for the backward body")
  if cfg.finetune.lm_weight and cfg.task.kind != "classify":
    raise UserError(f"config: finetune.lm_weight is for task.kind=classify, not {cfg.task.kind} (whose loss is "
                    "next-token prediction already)")
  if cfg.finetune.lm_weight and cfg.task.prefix_lm:
    raise UserError("config: finetune.lm_weight needs a causal body; with task.prefix_lm=true every token of the "
                    "text sees the next one")
  if cfg.finetune.reinit and not cfg.train.init_from:
    raise UserError("config: finetune.reinit names parameters not to load from train.init_from, which is not set")
  if cfg.data.source == "tfds" and not cfg.data.name:
    raise UserError("config: data.source=tfds needs data.name (e.g. tiny_shakespeare)")
  if cfg.data.source == "text" and not (cfg.data.files or cfg.data.file):
    raise UserError("config: data.source=text needs data.files (a file per split) or data.file")
  if cfg.tokenizer.include and cfg.tokenizer.kind != "word":
    raise UserError(f"config: tokenizer.include is for tokenizer.kind=word, not {cfg.tokenizer.kind!r}")
  if cfg.tokenizer.kind == "sentencepiece" and not cfg.tokenizer.vocab_size:
    raise UserError("config: tokenizer.kind=sentencepiece needs tokenizer.vocab_size")
  if cfg.tokenizer.kind == "word" and cfg.tokenizer.vocab_size is not None and cfg.tokenizer.vocab_size < 3:
    raise UserError(f"config: tokenizer.vocab_size={cfg.tokenizer.vocab_size} holds no word beside <unk> and "
                    "<eos> (tokenizer.kind=word needs ≥ 3)")
  for axis in ("data", "fsdp", "tensor"):
    size = getattr(cfg.mesh, axis)
    if size == 0 or size < -1:
      raise UserError(f"config: mesh.{axis}={size}; must be a positive size or -1 (the rest)")
  model_config(cfg, vocab_size=cfg.model.get("vocab_size") or 1 << 20)  # checks the model section
  return cfg


def model_config(cfg: Config, vocab_size: int) -> models.ModelConfig:
  """The typed model config of the run, with the tokenizer's vocabulary size filled in."""
  fields = dict(cfg.model)
  arch = fields.pop("arch", None)
  if not isinstance(arch, str) or arch not in models.CONFIGS:  # a list or a mapping is not hashable
    raise UserError(f"config: model.arch={arch!r}; allowed: {', '.join(models.CONFIGS)}")
  given = fields.get("vocab_size")
  if given is not None and given < vocab_size:
    raise UserError(f"config: model.vocab_size={given} is smaller than the tokenizer's {vocab_size}")
  fields["vocab_size"] = given or vocab_size
  schema = OmegaConf.structured(models.CONFIGS[arch])
  OmegaConf.set_readonly(schema, False)
  try:
    merged = OmegaConf.merge(schema, fields)
    return OmegaConf.to_object(merged)
  except OmegaConfBaseException as e:
    raise _omegaconf_error(e, "config: model", prefix="model.") from None
  except ValueError as e:
    raise UserError(f"config: {e}") from None


def merge_config(path: Optional[str], overrides: List[str] = ()) -> DictConfig:
  """Defaults ← YAML recipe (optional) ← dotted overrides, with keys and types checked."""
  layers = [OmegaConf.structured(Config)]
  if path is not None:
    if not os.path.isfile(path):
      raise UserError(f"config file not found: {path}")
    try:
      layers.append(OmegaConf.load(path))
    except Exception as e:  # YAML syntax
      raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(layers[-1], DictConfig):
      raise UserError(f"config file {path} holds a {type(layers[-1]).__name__.removesuffix('Config').lower()}"
                      "; a recipe is a mapping of sections (model:, data:, train:, ...)")
  for item in overrides:
    if "=" not in item:
      raise UserError(f"override {item!r} is not of the form key=value (e.g. train.steps=100)")
    try:
      OmegaConf.from_dotlist([item])
    except Exception as e:  # the value is not YAML (a control character, an unclosed bracket, ...)
      if isinstance(e, OmegaConfBaseException):
        raise _omegaconf_error(e, "config") from None
      raise UserError(f"override {item!r}: the value is not valid YAML ({str(e).splitlines()[0]}); "
                      "quote it") from None
  try:
    return OmegaConf.merge(*layers, OmegaConf.from_dotlist(list(overrides)))
  except OmegaConfBaseException as e:
    raise _omegaconf_error(e, "config") from None
  except TypeError:  # OmegaConf: "Cannot merge incompatible container types", naming nothing
    sources = [(f"config file {path}", layers[1])] if path is not None else []
    sources += [(f"override {item!r}", OmegaConf.from_dotlist([item])) for item in overrides]
    schema = OmegaConf.to_container(layers[0])
    for where, layer in sources:
      found = _shape_mismatch(schema, OmegaConf.to_container(layer), "")
      if found:
        key, wanted, given = found
        raise UserError(f"{where}: {key} takes a {wanted}, not a {given}") from None
    raise UserError("config: a list where a mapping belongs, or a mapping where a list does") from None


def _shape_mismatch(schema, given, prefix: str):
  """(key, what it takes, what it got) where `given` has a list for a mapping of `schema` or the
  reverse; None if nowhere."""
  kind = lambda v: "mapping" if isinstance(v, dict) else "list" if isinstance(v, list) else None
  if not isinstance(given, dict) or not isinstance(schema, dict):
    return None
  for key, value in given.items():
    if key not in schema:
      continue
    want, got = kind(schema[key]), kind(value)
    if want and got and want != got:
      return prefix + str(key), want, got
    found = _shape_mismatch(schema[key], value, f"{prefix}{key}.")
    if found:
      return found
  return None


def load_config(path: Optional[str], overrides: List[str] = ()) -> Config:
  """YAML recipe (optional) + dotted overrides → a validated `Config`."""
  merged = merge_config(path, overrides)
  try:
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
      raise UserError(f"config: {missing[0]} is required (e.g. {missing[0]}=runs/my_run)")
    cfg = OmegaConf.to_object(merged)
  except OmegaConfBaseException as e:
    raise _omegaconf_error(e, "config") from None
  return validate(cfg)


def to_dict(cfg: Config) -> dict:
  return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def from_dict(d: dict) -> Config:
  try:
    return validate(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), d)))
  except OmegaConfBaseException as e:
    raise _omegaconf_error(e, "saved config") from None


def to_yaml(cfg: Config) -> str:
  return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# ----------------------------------------------------------------------------- `nlm-jax config show`

# Model fields whose dataclass (nlm_jax/models/*) carries no trailing `# comment` to describe them.
MODEL_FIELD_HELP = {
    "arch": "'fnn' | 'rnn' | 'lstm' | 'transformer'",
    "vocab_size": "|V|; null = the tokenizer's vocabulary size",
    "d_embed": "m: embedding size",
    "d_hidden": "H: hidden units per layer",
    "n_layers": "L: layers",
    "d_model": "D: width of the residual stream",
    "n_heads": "H: attention heads (D must divide by H)",
    "pos_encoding": "'learned' | 'sinusoidal' | 'rotary' | 'none'",
    "activation": "the hidden-state nonlinearity: 'tanh' | 'relu'",
    "forget_bias": "initial forget-gate bias b_f",
    "dropout": "dropout rate p (0 = none)",
    "tie_embeddings": "the output projection is the embedding matrix transposed",
    "dtype": "compute dtype: 'float32' | 'bfloat16' | 'float16' | 'float64'",
    "param_dtype": "parameter dtype",
}


def field_help(cls) -> dict[str, str]:
  """Each field of a dataclass → the trailing `# comment` on its line of source (if any)."""
  import inspect
  import io
  import tokenize

  names = {f.name for f in dataclasses.fields(cls)}
  tokens = list(tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline))
  field_at_line, out = {}, {}
  line_starts = (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT)
  for prev, tok, nxt in zip([None] + tokens, tokens, tokens[1:] + [None]):
    if (tok.type == tokenize.NAME and tok.string in names and (prev is None or prev.type in line_starts)
        and nxt is not None and nxt.string == ":"):
      field_at_line[tok.start[0]] = tok.string
    elif tok.type == tokenize.COMMENT and tok.start[0] in field_at_line:
      out[field_at_line[tok.start[0]]] = tok.string.lstrip("#").strip()
  return out


def _model_help(cls) -> dict[str, str]:
  """The field's own comment, unless it is only a symbol ('m') that the table explains."""
  comments = field_help(cls)
  return {name: comments[name] if len(comments.get(name, "")) > 3 or name not in MODEL_FIELD_HELP
          else MODEL_FIELD_HELP[name] for name in {*comments, *MODEL_FIELD_HELP}}


def describe(path: Optional[str] = None, overrides: List[str] = ()) -> list[tuple[str, Any, Any, str]]:
  """(key, value, default, description) for every config key: the defaults, or a recipe's and the
  overrides' values. Model keys follow `model.arch`; without one, every architecture's are listed."""
  merged = merge_config(path, overrides)
  rows = []

  def section(cls, node, prefix):
    hints, helps = typing.get_type_hints(cls), field_help(cls)
    for f in dataclasses.fields(cls):
      key = prefix + f.name
      if f.name == "model":
        _model_rows(node.model, rows)
        continue
      if dataclasses.is_dataclass(hints[f.name]):
        section(hints[f.name], node[f.name], key + ".")
        continue
      value = _plain(node, f.name)
      default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
      rows.append((key, value, "???" if default is MISSING else default, helps.get(f.name, "")))

  section(Config, merged, "")
  return rows


def _plain(node: DictConfig, name: str):
  if OmegaConf.is_missing(node, name):
    return "???"
  value = node[name]
  return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


def _model_rows(node: DictConfig, rows: list) -> None:
  arch = node.get("arch")
  known = isinstance(arch, str) and arch in models.CONFIGS
  archs = [arch] if known else list(models.CONFIGS)
  if arch is not None and not known:
    raise UserError(f"config: model.arch={arch!r}; allowed: {', '.join(models.CONFIGS)}")
  arch_value = arch if arch is not None else "???"
  rows.append(("model.arch", arch_value, arch_value, "(required) " + MODEL_FIELD_HELP["arch"]))
  given = {k: v for k, v in OmegaConf.to_container(node).items() if k != "arch"}
  fields = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in models.CONFIGS.items()}
  if arch is None:  # shown (and type-checked) in each architecture that has the key; in none: a typo
    unknown = [k for k in given if not any(k in names for names in fields.values())]
    if unknown:
      raise UserError(f"config: model.{unknown[0]} is a key of no architecture ({', '.join(models.CONFIGS)})")
  for name in archs:
    cls = models.CONFIGS[name]
    schema = OmegaConf.structured(cls)
    OmegaConf.set_readonly(schema, False)
    if arch is None:  # every architecture shown: each with the overrides it has
      overrides = {k: v for k, v in given.items() if k in fields[name]}
    else:
      overrides = given if name == arch else {}
    try:
      values = OmegaConf.merge(schema, overrides)
    except OmegaConfBaseException as e:
      raise _omegaconf_error(e, "config: model", prefix="model.") from None
    helps = _model_help(cls)
    for f in dataclasses.fields(cls):
      default = None if f.name == "vocab_size" else f.default
      value = None if OmegaConf.is_missing(values, f.name) else _plain(values, f.name)
      where = "" if arch is not None else f"[{name}] "
      rows.append((f"model.{f.name}", value, default, where + helps.get(f.name, "")))
