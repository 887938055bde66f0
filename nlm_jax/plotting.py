"""Training curves from a run's metrics.jsonl: loss and perplexity against steps and tokens."""

from __future__ import annotations

import json
import os

from nlm_jax.errors import UserError


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise UserError(f"no metrics.jsonl in {workdir}")
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  if not records:
    raise UserError(f"{path} is empty")
  return records


def plot_run(workdir: str, output: str | None = None) -> str:
  """Writes a 2×2 PNG (loss / perplexity × steps / tokens) and returns its path."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  records = read_metrics(workdir)
  train = [r for r in records if "train_loss" in r]
  val = [r for r in records if "val_loss" in r]
  fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharey="row")
  for col, x in enumerate(("step", "tokens")):
    for row, (metric, label) in enumerate((("loss", "loss (nats/token)"), ("perplexity", "perplexity"))):
      ax = axes[row, col]
      ax.plot([r[x] for r in train], [r[f"train_{metric}"] for r in train], label="train", lw=1)
      if val:
        ax.plot([r[x] for r in val], [r[f"val_{metric}"] for r in val], "o-", label="validation", ms=3)
      ax.set_xlabel(x)
      ax.set_ylabel(label)
      if metric == "perplexity":
        ax.set_yscale("log")
      ax.grid(alpha=0.3)
      ax.legend()
  fig.suptitle(os.path.basename(os.path.abspath(workdir)))
  fig.tight_layout()
  output = output or os.path.join(workdir, "curves.png")
  fig.savefig(output, dpi=110)
  plt.close(fig)
  return output
