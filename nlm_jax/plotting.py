"""Training curves from a run's metrics.jsonl: loss and perplexity against steps and tokens, one
curve per kind of number (see `curves`)."""

from __future__ import annotations

import json
import os

from nlm_jax.errors import UserError


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise UserError(f"no metrics.jsonl in {workdir}")
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  records = []
  for i, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except ValueError:
      if i == len(lines) - 1:  # a trainer writing its next line right now
        break
      raise UserError(f"{path} line {i + 1} is not JSON: the file is damaged") from None
  if not records:
    raise UserError(f"{path} is empty")
  return records


def _estimate_label(workdir: str) -> str:
  """What val_loss is in this run: an estimate from `train.eval_batches` batches, or the whole split."""
  path = os.path.join(workdir, "resolved_config.yaml")
  if not os.path.exists(path):
    return "estimate"
  import yaml

  with open(path) as f:
    train = (yaml.safe_load(f) or {}).get("train", {})
  batches, estimator = train.get("eval_batches"), train.get("eval_estimator", "fixed")
  if batches is None:
    return "whole split"
  return f"{batches} batches, {'fresh random' if estimator == 'random_windows' else 'fixed'} windows"


def read_summary(workdir: str) -> dict:
  path = os.path.join(workdir, "summary.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def curves(records: list[dict], summary: dict | None = None) -> dict[str, list[tuple[int, int, float]]]:
  """The run's loss curves as (step, tokens, loss) points (from metrics.jsonl's records and
  summary.json), by what each number is:

    train               train_loss: mean over the training steps since the previous record
                        (train mode: dropout on, parameters changing during the window)
    train (eval mode)   eval_train_loss: training windows scored like validation, at each evaluation
    validation          val_loss: the periodic estimate (train.eval_batches batches)
    final               final_<split>_loss (summary.json): the whole evaluation split, final parameters
  """
  # a classification run counts examples where a language model counts tokens
  points = lambda key: [(r["step"], r.get("tokens", r.get("examples")), r[key]) for r in records if key in r]
  summary = summary or {}
  final_key = next((k for k in summary if k.startswith("final_") and k.endswith("_loss")), None)
  seen = summary.get("tokens_seen", summary.get("examples_seen"))
  final = [(summary["steps"], seen, summary[final_key])] if final_key else []
  return {"train": points("train_loss"), "train (eval mode)": points("eval_train_loss"),
          "validation": points("val_loss"), "final": final}


def plot_run(workdir: str, output: str | None = None) -> str:
  """Writes a 2×2 PNG (loss / perplexity × steps / tokens) and returns its path."""
  import math

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  lines = curves(read_metrics(workdir), read_summary(workdir))
  labels = {"train": "train_loss (training steps, dropout on)",
            "train (eval mode)": "eval_train_loss (training windows, eval mode)",
            "validation": f"val_loss ({_estimate_label(workdir)})",
            "final": "final validation loss (whole split)"}
  styles = {"train": dict(lw=1), "train (eval mode)": dict(marker="s", ms=3, lw=1),
            "validation": dict(marker="o", ms=3), "final": dict(marker="*", ms=12, ls="none", color="black")}
  fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharey="row")
  for col, x in enumerate(("step", "tokens")):
    for row, label in enumerate(("loss (nats/token)", "perplexity")):
      ax = axes[row, col]
      for name, pts in lines.items():
        if pts:
          ys = [p[2] if row == 0 else math.exp(min(p[2], 700.0)) for p in pts]
          ax.plot([p[col] for p in pts], ys, label=labels[name], **styles[name])
      ax.set_xlabel(x)
      ax.set_ylabel(label)
      if row == 1:
        ax.set_yscale("log")
      ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=8)
  fig.suptitle(os.path.basename(os.path.abspath(workdir)))
  fig.tight_layout()
  output = output or os.path.join(workdir, "curves.png")
  ext = os.path.splitext(output)[1][1:].lower()
  supported = fig.canvas.get_supported_filetypes()
  if ext and ext not in supported:
    plt.close(fig)
    raise UserError(f"--output {output}: matplotlib writes no .{ext} files ({', '.join(sorted(supported))})")
  fig.savefig(output, dpi=110, format=ext or "png")  # a name without a suffix: PNG at that very path
  plt.close(fig)
  return output
