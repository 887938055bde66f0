"""The run configuration: typed dataclasses, YAML recipes and dotted command-line overrides.

OmegaConf checks keys and types: `train.stpes=10` or `train.steps=ten` fail with the key named.
The model section is checked against the dataclass of its `arch` (nlm_jax.models.CONFIGS).

    cfg = load_config("experiments/configs/shakespeare_char_transformer.yaml",
                      ["workdir=runs/x", "train.steps=100"])
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nlm_jax import models
from nlm_jax.errors import UserError


@dataclasses.dataclass
class DataConfig:
  source: str = "text"  # 'tfds' | 'text'
  # TFDS
  name: Optional[str] = None  # e.g. tiny_shakespeare, lm1b, imdb_reviews
  data_dir: Optional[str] = None
  text_feature: str = "text"
  max_examples: Optional[int] = None  # per split; None = all
  # local text: a file per split, or one file cut by fractions into train/validation[/test]
  files: Dict[str, str] = dataclasses.field(default_factory=dict)
  file: Optional[str] = None
  split_fractions: List[float] = dataclasses.field(default_factory=lambda: [0.9, 0.1])
  train_split: str = "train"
  eval_split: str = "validation"
  # batching
  batching: str = "windows"  # 'windows' (random windows, nanoGPT) | 'streams' (truncated BPTT)
  batch_size: int = 12
  seq_len: int = 64
  eval_batch_size: Optional[int] = None  # None = batch_size
  cache_dir: Optional[str] = None  # None = $NLM_JAX_CACHE or ~/.cache/nlm-jax


@dataclasses.dataclass
class TokenizerConfig:
  kind: str = "char"  # 'char' | 'byte' | 'word' | 'sentencepiece'
  vocab_size: Optional[int] = None  # word: max vocabulary (None = all); sentencepiece: required
  min_count: int = 1  # word: drop rarer words to <unk>
  model_type: str = "bpe"  # sentencepiece: 'bpe' | 'unigram'
  character_coverage: float = 1.0  # sentencepiece


@dataclasses.dataclass
class OptimConfig:
  name: str = "adamw"  # 'sgd' | 'momentum' | 'nesterov' | 'adam' | 'adamw'
  lr: float = 1e-3
  momentum: float = 0.9
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  weight_decay_mode: Optional[str] = None  # 'decoupled' | 'l2'; None: decoupled for adamw, else l2
  decay_exclude: List[str] = dataclasses.field(default_factory=lambda: ["bias", "norm"])  # + 'embedding'
  clip_norm: Optional[float] = None  # global-norm clipping
  schedule: str = "constant"  # 'constant' | 'warmup_cosine' | 'plateau'
  warmup_steps: int = 0
  decay_steps: Optional[int] = None  # cosine length; None = train.steps
  min_lr: float = 0.0
  plateau_factor: float = 0.25  # 'plateau': lr *= factor when validation loss stops improving
  plateau_patience: int = 1  # evaluations without improvement before a decay
  grad_accum: int = 1  # micro-batches per optimizer step (optax.MultiSteps)


@dataclasses.dataclass
class TrainConfig:
  steps: int = 1000  # optimizer steps
  stop_after: Optional[int] = None  # stop (with a checkpoint) at this step; the schedule still uses steps
  log_every: int = 10
  eval_every: int = 250
  eval_batches: Optional[int] = 20  # batches per periodic validation; None = the whole split
  checkpoint_every: Optional[int] = None  # None = eval_every
  keep_checkpoints: int = 2  # the last N, plus the best by validation loss
  init_from: Optional[str] = None  # run dir or checkpoint dir: start from its params only
  progress: bool = True


@dataclasses.dataclass
class MeshConfig:
  data: int = -1  # −1 takes the devices the other axes leave
  fsdp: int = 1
  tensor: int = 1


@dataclasses.dataclass
class DistributedConfig:
  initialize: bool = False  # call jax.distributed.initialize() (TPU pods, SLURM: no other keys needed)
  coordinator_address: Optional[str] = None  # host:port of process 0
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  cpu_collectives: str = "gloo"  # CPU only: collectives across processes


@dataclasses.dataclass
class Config:
  workdir: str = MISSING
  seed: int = 0
  model: Dict[str, Any] = dataclasses.field(default_factory=dict)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)


CHOICES = {
    "data.source": ("tfds", "text"),
    "data.batching": ("windows", "streams"),
    "tokenizer.kind": ("char", "byte", "word", "sentencepiece"),
    "tokenizer.model_type": ("bpe", "unigram"),
    "optim.name": ("sgd", "momentum", "nesterov", "adam", "adamw"),
    "optim.weight_decay_mode": (None, "decoupled", "l2"),
    "optim.schedule": ("constant", "warmup_cosine", "plateau"),
}
POSITIVE = ("data.batch_size", "data.seq_len", "train.steps", "train.log_every", "train.eval_every",
            "train.keep_checkpoints", "optim.grad_accum")


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
  if cfg.optim.name == "adamw" and cfg.optim.weight_decay_mode == "l2":
    raise UserError("config: optim.name=adamw has decoupled weight decay; use optim.name=adam "
                    "for optim.weight_decay_mode=l2")
  unknown = sorted(set(cfg.optim.decay_exclude) - {"bias", "norm", "embedding"})
  if unknown:
    raise UserError(f"config: optim.decay_exclude has {unknown[0]!r}; allowed: bias, norm, embedding")
  if cfg.data.source == "tfds" and not cfg.data.name:
    raise UserError("config: data.source=tfds needs data.name (e.g. tiny_shakespeare)")
  if cfg.data.source == "text" and not (cfg.data.files or cfg.data.file):
    raise UserError("config: data.source=text needs data.files (a file per split) or data.file")
  if cfg.tokenizer.kind == "sentencepiece" and not cfg.tokenizer.vocab_size:
    raise UserError("config: tokenizer.kind=sentencepiece needs tokenizer.vocab_size")
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
  if arch not in models.CONFIGS:
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


def load_config(path: Optional[str], overrides: List[str] = ()) -> Config:
  """YAML recipe (optional) + dotted overrides → a validated `Config`."""
  schema = OmegaConf.structured(Config)
  layers = [schema]
  if path is not None:
    if not os.path.isfile(path):
      raise UserError(f"config file not found: {path}")
    try:
      layers.append(OmegaConf.load(path))
    except Exception as e:  # YAML syntax
      raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
  for item in overrides:
    if "=" not in item:
      raise UserError(f"override {item!r} is not of the form key=value (e.g. train.steps=100)")
  try:
    layers.append(OmegaConf.from_dotlist(list(overrides)))
    merged = OmegaConf.merge(*layers)
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
