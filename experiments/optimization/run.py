"""Optimization: SGD, momentum, Adam and AdamW; L2 in the loss against decoupled weight decay;
constant, warm-up + cosine and plateau schedules; a learning-rate sweep.

    python -m experiments.optimization.run            # ~30 min on 2 CPU cores
    python -m experiments.optimization.run --quick    # seconds, on generated toy corpora

Two short-budget workloads, each trained by `nlm-jax train` for every setting and seed: a small
Transformer on Tiny Shakespeare characters and a small LSTM on WikiText-2 words. Every setting
changes one thing against the baseline (AdamW at the workload's usual learning rate, 10% linear
warm-up then cosine to a tenth). Reported: the whole validation split's perplexity at the end and
the training-loss curves. Writes results.json, results.md and one PNG per workload beside this
file (or --out), and the tables into README.md between its markers.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import statistics
from collections.abc import Callable

from experiments.common import (add_jobs_argument, add_runs_argument, mean_std, run_parallel, scratch, train_in_process,
                                train_summary, unigram_perplexity, write_results)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DATA = os.path.join(ROOT, "..", "shared", "data")

WORKLOADS = {
    "shakespeare_transformer": dict(
        title="Tiny Shakespeare, Transformer (2 layers × 4 heads × 128), batches 16 × 64",
        data=["data.source=text", f"data.file={DATA}/tiny_shakespeare/input.txt", "data.split_fractions=[0.9,0.1]",
              "tokenizer.kind=char", "data.batching=windows", "data.batch_size=16", "data.seq_len=64"],
        model=["model.arch=transformer", "model.n_layers=2", "model.n_heads=4", "model.d_model=128",
               "model.context=64", "model.use_bias=false"],
        steps=300, lr={"sgd": 1.0, "momentum": 0.1, "adam": 2e-3, "adamw": 2e-3}, weight_decay=0.1, clip=1.0),
    "wikitext2_lstm": dict(
        title="WikiText-2 (10,000 most frequent words), LSTM (1 layer of 64, tied embeddings), batches 20 × 35",
        data=["data.source=text", f"data.files.train={DATA}/wikitext-2/train.txt",
              f"data.files.validation={DATA}/wikitext-2/valid.txt", "tokenizer.kind=word",
              # the 10,000 most frequent words (as the n-gram experiment): at 33,278 a run took ~3-5
              # min here, most of it in the softmax, and the 33 runs ~1.5 h
              "tokenizer.vocab_size=10000", "data.batching=streams",
              "data.batch_size=20", "data.seq_len=35", "data.eval_batch_size=20"],
        model=["model.arch=lstm", "model.n_layers=1", "model.d_embed=64", "model.d_hidden=64",
               "model.tie_embeddings=true"],
        steps=200, lr={"sgd": 20.0, "momentum": 2.0, "adam": 5e-3, "adamw": 5e-3}, weight_decay=0.01, clip=0.25),
}
LR_FACTORS = (0.3, 3.0, 10.0)  # the sweep around the baseline's learning rate (1×)


def settings(w: dict) -> dict[str, tuple[str, list[str]]]:
  """name → (group, optimizer overrides); every setting differs from the baseline in one way."""
  steps, lr = w["steps"], w["lr"]
  cosine = ["optim.schedule=warmup_cosine", f"optim.warmup_steps={steps // 10}"]

  def opt(name: str, lr_: float, *extra: str) -> list[str]:
    return [f"optim.name={name}", f"optim.lr={lr_:g}", f"optim.min_lr={lr_ / 10:g}", f"optim.clip_norm={w['clip']}",
            *extra]

  wd = w["weight_decay"]
  base = opt("adamw", lr["adamw"], f"optim.weight_decay={wd}", *cosine)
  out = {
      "AdamW (baseline)": ("optimizer", base),
      "SGD": ("optimizer", opt("sgd", lr["sgd"], *cosine)),
      "SGD + momentum 0.9": ("optimizer", opt("momentum", lr["momentum"], *cosine)),
      "Adam": ("optimizer", opt("adam", lr["adam"], *cosine)),
      f"Adam + L2 in the loss (λ = {wd:g})": ("weight decay", opt("adam", lr["adam"], f"optim.weight_decay={wd}",
                                                                 "optim.weight_decay_mode=l2", *cosine)),
      "AdamW, constant lr": ("schedule", opt("adamw", lr["adamw"], f"optim.weight_decay={wd}",
                                             "optim.schedule=constant")),
      "AdamW, plateau ÷4": ("schedule", opt("adamw", lr["adamw"], f"optim.weight_decay={wd}", "optim.schedule=plateau",
                                            "optim.plateau_factor=0.25", "optim.plateau_patience=1")),
  }
  for f in LR_FACTORS:
    out[f"AdamW, lr × {f:g}"] = ("learning rate", opt("adamw", lr["adamw"] * f, f"optim.weight_decay={wd}", *cosine))
  return out


def toy(directory: str) -> None:
  rng = random.Random(0)
  words = "the cat dog sat ran on a mat tree big small red".split()
  text = "\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(300)) + "\n"
  for name, body in (("chars.txt", text), ("train.txt", text), ("valid.txt", text[:2000])):
    with open(os.path.join(directory, name), "w") as f:
      f.write(body)


def quick_workload(w: dict, directory: str) -> dict:
  data = [o for o in w["data"] if not o.startswith(("data.file", "data.split"))]
  data = [o.replace("batch_size=16", "batch_size=4").replace("batch_size=20", "batch_size=4") for o in data]
  data += ([f"data.file={directory}/chars.txt", "data.split_fractions=[0.9,0.1]"] if "tokenizer.kind=char" in data
           else [f"data.files.train={directory}/train.txt", f"data.files.validation={directory}/valid.txt"])
  small = {"model.d_model": 16, "model.n_heads": 2, "model.n_layers": 1, "model.d_embed": 8, "model.d_hidden": 8}
  model = [f"{o.split('=')[0]}={small[o.split('=')[0]]}" if o.split("=")[0] in small else o for o in w["model"]]
  return {**w, "data": data + [f"data.cache_dir={directory}/cache"], "model": model, "steps": 4}


def train_curve(workdir: str) -> list[tuple[int, float]]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [(r["step"], r["train_loss"]) for r in map(json.loads, f)]


def one_run(name: str, w: dict, setting: str, optim: list[str], workdir: str, seed: int) -> dict:
  steps = w["steps"]
  summary = train_summary(workdir, [*w["data"], *w["model"], *optim, f"train.steps={steps}",
                                     f"train.eval_every={max(steps // 8, 1)}", "train.eval_batches=10",
                                     f"train.log_every={max(steps // 30, 1)}", f"seed={seed}"])
  wall = summary["wall_s"]
  print(f"{name} | {setting} | seed {seed}: validation perplexity {summary['final_validation_perplexity']:.2f} "
        f"({wall:.0f} s)", flush=True)
  return {"val_ppl": summary["final_validation_perplexity"], "curve": train_curve(workdir), "wall_s": wall}


def workload_runs(name: str, w: dict, seeds: int, tmp: str, only: set | None) -> list[tuple[str, str, Callable]]:
  """(setting, group, run) for every setting and seed of a workload, in order."""
  out = []
  chosen = [(setting, group, optim) for setting, (group, optim) in settings(w).items()
            if not only or group in only or setting == "AdamW (baseline)"]
  for i, (setting, group, optim) in enumerate(chosen, 1):
    for seed in range(1, seeds + 1):
      workdir = os.path.join(tmp, f"{name}_{i}_seed{seed}")
      out.append((setting, group, functools.partial(one_run, name, w, setting, optim, workdir, seed)))
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="toy corpora and a few steps (seconds; what CI runs)")
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--workloads", default=",".join(WORKLOADS))
  ap.add_argument("--groups", default=None, help="comma list of: optimizer,weight decay,schedule,learning rate")
  ap.add_argument("--out", default=None, help="folder for results (default: beside this file; quick: a temp dir)")
  add_runs_argument(ap)
  add_jobs_argument(ap, 2)
  args = ap.parse_args()
  tmp = scratch("optimization-", args.runs)
  train_in_process(args.quick)  # quick: every run in this process, one after the other
  out = args.out or (tmp if args.quick else HERE)
  if args.quick:
    toy(tmp)
  only = set(args.groups.split(",")) if args.groups else None
  workloads = {name: quick_workload(WORKLOADS[name], tmp) if args.quick else WORKLOADS[name]
               for name in args.workloads.split(",")}
  runs = [(name, *run) for name, w in workloads.items() for run in workload_runs(name, w, args.seeds, tmp, only)]
  done = run_parallel([run for *_, run in runs], args.jobs)  # both workloads in one pool
  results = {name: {"title": w["title"], "steps": w["steps"], "rows": {},
                    "unigram": unigram_perplexity([*w["data"], *w["model"]], os.path.join(tmp, f"{name}_1_seed1"))}
             for name, w in workloads.items()}
  for (name, setting, group, _), r in zip(runs, done):
    row = results[name]["rows"].setdefault(setting, {"group": group, "val_ppl": [], "curves": [], "wall_s": []})
    row["val_ppl"].append(r["val_ppl"])
    row["curves"].append(r["curve"])
    row["wall_s"].append(r["wall_s"])

  lines = []
  for name, res in results.items():
    base = statistics.mean(res["rows"]["AdamW (baseline)"]["val_ppl"])
    lines += [f"**{res['title']}**, {res['steps']} steps (mean ± std over {args.seeds} seeds)", "",
              "| setting | changes | validation perplexity (whole split) | vs baseline |", "|---|---|---:|---:|",
              f"| unigram (training-split frequencies, no training) | reference | {res['unigram']:.2f} | "
              f"{100 * (res['unigram'] / base - 1):+.1f}% |"]
    for setting, r in res["rows"].items():
      rel = statistics.mean(r["val_ppl"]) / base - 1
      lines.append(f"| {setting} | {r['group']} | {mean_std(r['val_ppl'], 2)} | {100 * rel:+.1f}% |")
    lines.append("")
  if args.quick:
    lines.append("QUICK MODE on toy corpora, not a result.")
  table = "\n".join(lines).rstrip()
  print(table)
  write_results(out, table, {"quick": args.quick, "seeds": args.seeds, "results": results},
                update_readme=not args.quick)
  for name, res in results.items():
    plot(res, os.path.join(out, f"{name}.png"))


def plot(res: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  groups = list(dict.fromkeys(r["group"] for r in res["rows"].values()))
  fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 4), squeeze=False)
  for ax, group in zip(axes[0], groups):
    for i, (setting, r) in enumerate(res["rows"].items()):
      if r["group"] != group and setting != "AdamW (baseline)":
        continue
      steps = [s for s, _ in r["curves"][0]]
      losses = np.mean([[l for _, l in c] for c in r["curves"]], axis=0)  # mean over seeds
      ax.plot(steps, losses, label=setting, color="black" if setting == "AdamW (baseline)" else f"C{i}")
    ax.set_title(group)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
  axes[0][0].set_ylabel("training loss (nats/token, mean over seeds)")
  fig.suptitle(res["title"])
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
