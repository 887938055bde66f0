"""The four language models, one calling convention:

    model = build(config)
    variables = model.init(jax.random.key(0), tokens_BxT)
    out = model.apply(variables, tokens_BxT, carry, deterministic=True,
                      rngs={"dropout": key})          # dropout key only when deterministic=False
    out.logits  (B, T, V)   out.carry  (state for the next call)   out.hidden  (B, T, D)

`carry=None` starts from the initial state (zero RNN/LSTM state, BOS window, or a plain causal
forward for the Transformer); `model.initial_carry(B)` gives that state explicitly (an empty
KV cache for the Transformer).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Union

from nlm_jax.models.fnn import FNN, FNNConfig
from nlm_jax.models.layers import LMOutput
from nlm_jax.models.lstm import LSTM, LSTMConfig
from nlm_jax.models.rnn import RNN, RNNConfig
from nlm_jax.models.transformer import KVCache, Transformer, TransformerConfig

ModelConfig = Union[FNNConfig, RNNConfig, LSTMConfig, TransformerConfig]
CONFIGS: dict[str, type] = {c.arch: c for c in (FNNConfig, RNNConfig, LSTMConfig, TransformerConfig)}
_BUILDERS = {"fnn": FNN, "rnn": RNN, "lstm": LSTM, "transformer": Transformer}


def build(config: ModelConfig, name: str | None = None):
  """The Flax module for an architecture config (`name`: as a submodule of another, e.g. the
  body of a classifier)."""
  arch = getattr(config, "arch", None)
  if arch not in _BUILDERS:
    raise ValueError(f"unknown model config {type(config).__name__}; expected one of "
                     f"{', '.join(c.__name__ for c in CONFIGS.values())}")
  return _BUILDERS[arch](config, name=name)


def config_from_dict(fields: dict[str, Any]) -> ModelConfig:
  """`{'arch': 'lstm', 'vocab_size': 100, ...}` → LSTMConfig(...); unknown fields raise."""
  fields = dict(fields)
  arch = fields.pop("arch", None)
  if arch not in CONFIGS:
    raise ValueError(f"invalid model config: arch={arch!r}; allowed: {', '.join(CONFIGS)}")
  cls = CONFIGS[arch]
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(fields) - names)
  if unknown:
    raise ValueError(f"invalid model config: unknown field {unknown[0]!r} for arch={arch}; "
                     f"allowed: {', '.join(sorted(names))}")
  return cls(**fields)


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
  return {"arch": config.arch, **dataclasses.asdict(config)}


__all__ = ["build", "config_from_dict", "config_to_dict", "CONFIGS", "ModelConfig", "LMOutput", "KVCache",
           "FNN", "FNNConfig", "RNN", "RNNConfig", "LSTM", "LSTMConfig", "Transformer", "TransformerConfig"]
