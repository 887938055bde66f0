"""Architectures at equal budget: FNN, RNN, LSTM and Transformer on Tiny Shakespeare (characters)
and WikiText-2 (words).

    python -m experiments.architectures.run            # ~30 min on 2 CPU cores
    python -m experiments.architectures.run --quick    # seconds, on a generated toy corpus

On each corpus every architecture trains by `nlm-jax train` on the same batches' geometry
(B × T), the same number of steps (so the same training tokens) and the same optimizer (AdamW,
warm-up then cosine), from its own seeds; what differs is the network. Reported: parameters,
the whole validation split's perplexity at the end (`final_validation_perplexity`), the wall time
of the command, and the validation curve against tokens and against seconds (`metrics.jsonl`'s
`tokens` and `elapsed_s`). Writes results.json, results.md and one PNG per corpus beside this
file (or --out), and the table into README.md between its markers.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import statistics

from experiments.common import (add_jobs_argument, add_runs_argument, mean_std, run_parallel, scratch, train_in_process,
                                train_summary, unigram_perplexity, write_results)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DATA = os.path.join(ROOT, "..", "shared", "data")

OPTIM = ["optim.name=adamw", "optim.b2=0.99", "optim.weight_decay=0.01", "optim.clip_norm=1.0",
         "optim.schedule=warmup_cosine", "optim.warmup_steps=50"]

# corpus → (data overrides, lr, steps, {arch: model overrides})
CORPORA = {
    "shakespeare": dict(
        title="Tiny Shakespeare, characters",
        data=["data.source=text", f"data.file={DATA}/tiny_shakespeare/input.txt", "data.split_fractions=[0.9,0.1]",
              "tokenizer.kind=char", "data.batch_size=32", "data.seq_len=64"],
        lr=2e-3, steps=300, unit="char",
        archs={"fnn": ["model.arch=fnn", "model.context=8", "model.d_embed=32", "model.d_hidden=512",
                       "model.direct=true", "data.batching=windows"],
               "rnn": ["model.arch=rnn", "model.n_layers=2", "model.d_embed=256", "model.d_hidden=256",
                       "data.batching=streams"],
               "lstm": ["model.arch=lstm", "model.n_layers=2", "model.d_embed=256", "model.d_hidden=256",
                        "data.batching=streams"],
               "transformer": ["model.arch=transformer", "model.n_layers=4", "model.n_heads=4", "model.d_model=128",
                               "model.context=64", "model.use_bias=false", "data.batching=windows"]}),
    "wikitext2": dict(
        title="WikiText-2, words",
        data=["data.source=text", f"data.files.train={DATA}/wikitext-2/train.txt",
              f"data.files.validation={DATA}/wikitext-2/valid.txt", "tokenizer.kind=word",
              # the 10,000 most frequent words and 64-wide models (as the optimization experiment): at
              # 33,278 words and 128 wide, the softmax made the 12 runs take ~65 min here
              "tokenizer.vocab_size=10000", "data.batch_size=20",
              "data.seq_len=35", "data.eval_batch_size=20"],
        lr=2e-3, steps=250, unit="word",
        archs={"fnn": ["model.arch=fnn", "model.context=5", "model.d_embed=64", "model.d_hidden=64",
                       "model.direct=false", "model.bos_id=1", "data.batching=streams"],
               "rnn": ["model.arch=rnn", "model.n_layers=1", "model.d_embed=64", "model.d_hidden=64",
                       "model.tie_embeddings=true", "data.batching=streams"],
               "lstm": ["model.arch=lstm", "model.n_layers=1", "model.d_embed=64", "model.d_hidden=64",
                        "model.tie_embeddings=true", "data.batching=streams"],
               "transformer": ["model.arch=transformer", "model.n_layers=2", "model.n_heads=4", "model.d_model=64",
                               "model.context=35", "model.pos_encoding=rotary", "data.batching=windows"]}),
}


def toy_corpora(directory: str) -> None:
  """Small stand-ins for --quick: a character text and word-level train/validation files."""
  rng = random.Random(0)
  words = "the cat dog sat ran on a mat tree big small red".split()
  text = "\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(300)) + "\n"
  with open(os.path.join(directory, "chars.txt"), "w") as f:
    f.write(text)
  for split in ("train", "valid"):
    with open(os.path.join(directory, f"{split}.txt"), "w") as f:
      f.write(text if split == "train" else text[:2000])


def quick_settings(corpus: dict, directory: str, name: str) -> dict:
  shrink = {"model.d_hidden": 16, "model.d_embed": 16, "model.d_model": 16, "model.n_heads": 2, "model.n_layers": 1}
  archs = {a: [f"{k}={shrink[k]}" if k in shrink else o for o in ov for k in [o.split("=")[0]]]
           for a, ov in corpus["archs"].items()}
  data = [o for o in corpus["data"] if not o.startswith(("data.file", "data.files", "data.split"))]
  data = [o.replace("batch_size=32", "batch_size=4").replace("batch_size=20", "batch_size=4") for o in data]
  if name == "shakespeare":
    data += [f"data.file={directory}/chars.txt", "data.split_fractions=[0.9,0.1]"]
  else:
    data += [f"data.files.train={directory}/train.txt", f"data.files.validation={directory}/valid.txt"]
  return {**corpus, "data": data + [f"data.cache_dir={directory}/cache"], "steps": 6, "archs": archs}


def curve(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{"tokens": r["tokens"], "elapsed_s": r["elapsed_s"], "val_loss": r["val_loss"]}
            for r in map(json.loads, f) if "val_loss" in r]


def one_run(name: str, corpus: dict, arch: str, model: list[str], workdir: str, seed: int) -> dict:
  steps = corpus["steps"]
  summary = train_summary(workdir, [*corpus["data"], *model, *OPTIM, f"optim.lr={corpus['lr']}",
                                     f"optim.min_lr={corpus['lr'] / 10}", f"train.steps={steps}",
                                     f"train.eval_every={max(steps // 6, 1)}", "train.eval_batches=20",
                                     f"train.log_every={max(steps // 6, 1)}", f"seed={seed}"])
  wall = summary["wall_s"]
  print(f"{name} {arch} seed {seed}: validation perplexity {summary['final_validation_perplexity']:.2f}, "
        f"{summary['params']:,} parameters, {wall:.0f} s", flush=True)
  return {"val_ppl": summary["final_validation_perplexity"], "wall_s": wall, "params": summary["params"],
          "tokens": summary["tokens_seen"], "curve": curve(workdir)}


def run_corpus(name: str, corpus: dict, seeds: int, tmp: str, jobs: int) -> dict:
  keys, tasks = [], []
  for arch, model in corpus["archs"].items():
    for seed in range(1, seeds + 1):
      keys.append(arch)
      tasks.append(functools.partial(one_run, name, corpus, arch, model,
                                     os.path.join(tmp, f"{name}_{arch}_seed{seed}"), seed))
  rows = {}
  for arch, r in zip(keys, run_parallel(tasks, jobs)):  # in seed order
    row = rows.setdefault(arch, {"val_ppl": [], "wall_s": [], "params": None, "curves": []})
    row["val_ppl"].append(r["val_ppl"])
    row["wall_s"].append(r["wall_s"])
    row["params"], row["tokens"] = r["params"], r["tokens"]
    row["curves"].append(r["curve"])
  return rows


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="toy corpora and a few steps (seconds; what CI runs)")
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--corpora", default="shakespeare,wikitext2")
  ap.add_argument("--out", default=None, help="folder for results (default: beside this file; quick: a temp dir)")
  add_runs_argument(ap)
  add_jobs_argument(ap, 1)  # 1: the wall times are part of the result
  args = ap.parse_args()
  tmp = scratch("architectures-", args.runs)
  train_in_process(args.quick)  # quick: every run in this process, one after the other
  out = args.out or (tmp if args.quick else HERE)
  if args.quick:
    toy_corpora(tmp)
  results = {}
  for name in args.corpora.split(","):
    corpus = quick_settings(CORPORA[name], tmp, name) if args.quick else CORPORA[name]
    rows = run_corpus(name, corpus, args.seeds, tmp, args.jobs)
    first = next(iter(corpus["archs"]))
    results[name] = {"title": corpus["title"], "steps": corpus["steps"], "unit": corpus["unit"], "rows": rows,
                     "unigram": unigram_perplexity([*corpus["data"], *corpus["archs"][first]],
                                                   os.path.join(tmp, f"{name}_{first}_seed1"))}

  lines = []
  for name, res in results.items():
    some = next(iter(res["rows"].values()))
    lines += [f"**{res['title']}**: {res['steps']} steps, {some['tokens']:,} training tokens for every model "
              f"(mean ± std over {args.seeds} seeds)", "",
              "| model | parameters | validation perplexity (whole split) | wall time of `nlm-jax train` |",
              "|---|---:|---:|---:|",
              f"| unigram (training-split frequencies, no training) | — | {res['unigram']:.2f} | — |"]
    for arch, r in res["rows"].items():
      lines.append(f"| {arch.upper() if arch != 'transformer' else 'Transformer'} | {r['params']:,} | "
                   f"{mean_std(r['val_ppl'], 2)} | {mean_std(r['wall_s'], 0)} s |")
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

  fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
  for i, (arch, r) in enumerate(res["rows"].items()):
    color = f"C{i}"
    label = arch.upper() if arch != "transformer" else "Transformer"
    for key, ax in (("tokens", axes[0]), ("elapsed_s", axes[1])):
      for j, c in enumerate(r["curves"]):
        ax.plot([p[key] for p in c], [np.exp(p["val_loss"]) for p in c], color=color, alpha=0.8,
                label=label if j == 0 else None)
    axes[2].errorbar([r["params"]], [statistics.mean(r["val_ppl"])],
                     yerr=[statistics.stdev(r["val_ppl"]) if len(r["val_ppl"]) > 1 else 0.0],
                     fmt="o", color=color, label=label, capsize=3)
  axes[0].set_xlabel("training tokens")
  axes[1].set_xlabel("seconds of training (evaluations included)")
  axes[2].set_xlabel("parameters")
  axes[2].set_xscale("log")
  axes[0].set_ylabel(f"validation perplexity (per {res['unit']}, 20 batches)")
  axes[2].set_ylabel("final validation perplexity (whole split)")
  for ax in axes:
    ax.set_yscale("log")
    ax.legend(fontsize=8)
  fig.suptitle(f"{res['title']}: architectures at equal budget ({res['steps']} steps)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
