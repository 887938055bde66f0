"""Pretrain, then fine-tune: how much does language-model pretraining buy on sentiment
classification (SST-2) and translation (Multi30k en→de)?

    python -m experiments.pretrain_finetune.run --tasks sst2 --archs lstm      # real data (hours on CPU)
    python -m experiments.pretrain_finetune.run                                # both tasks, LSTM and Transformer
    python -m experiments.pretrain_finetune.run --quick                        # seconds, toy data

For each task and architecture: one language model is pretrained on the task's own unlabelled
text (SST-2: its training sentences; Multi30k: its English and German training lines, unaligned
and shuffled) by `nlm-jax train --config experiments/configs/pretrain_<task>_<arch>.yaml`; then
the task's recipe (`experiments/configs/<task>_<arch>.yaml`) trains from scratch and from the
pretrained run (`train.init_from`), with the same budget, for each seed. Reported: SST-2 dev
accuracy; Multi30k test BLEU (sacrebleu, detokenized, beam search; `nlm-jax eval --split test`)
and validation loss; mean ± std over seeds, and the validation curves of both arms as a PNG.
Writes results.json, results.md and <task>_curves.png beside this file (or --out), and the table
into README.md between its markers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys

from experiments.common import ROOT, add_runs_argument, mean_std, nlm_jax_train, scratch, write_results

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(ROOT, "..", "shared", "data")
CONFIGS = os.path.join(ROOT, "experiments", "configs")
TASKS = {"sst2": {"metric": "accuracy", "split": "validation", "title": "SST-2 dev accuracy (%)"},
         "multi30k": {"metric": "bleu", "split": "test", "title": "Multi30k en→de test BLEU"}}
RECIPES = {("sst2", "lstm"): "sst2_lstm", ("sst2", "transformer"): "sst2_transformer",
           ("multi30k", "lstm"): "multi30k_en_de_lstm", ("multi30k", "transformer"): "multi30k_en_de_transformer"}


def unlabelled_text(task: str, directory: str, data: str) -> str:
  """The pretraining text of a task, one sentence per line: SST-2's training sentences, or
  Multi30k's English and German training lines shuffled together."""
  if task == "sst2":
    path = os.path.join(directory, "sst2_sentences.txt")
    with open(os.path.join(data, "sst2", "train.tsv"), encoding="utf-8") as f:
      lines = [row.split("\t")[0] for row in f.read().splitlines()[1:] if row.strip()]
  else:
    path = os.path.join(directory, "multi30k_monolingual.txt")
    lines = []
    for lang in ("en", "de"):
      with open(os.path.join(data, "multi30k", f"train.{lang}"), encoding="utf-8") as f:
        lines += [line for line in f.read().splitlines() if line.strip()]
    random.Random(0).shuffle(lines)
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return path


def toy_data(directory: str) -> str:
  """A toy sst2/ and multi30k/ in the layout of ../shared/data, for --quick."""
  rng = random.Random(0)
  os.makedirs(os.path.join(directory, "sst2"), exist_ok=True)
  os.makedirs(os.path.join(directory, "multi30k"), exist_ok=True)
  pos, neg, filler = ["good", "great", "superb"], ["bad", "dull", "awful"], "the movie was a plot very it".split()
  for split, n in (("train", 300), ("dev", 60)):
    rows = ["sentence\tlabel"]
    for _ in range(n):
      label = rng.randint(0, 1)
      words = [rng.choice(filler) for _ in range(rng.randint(2, 10))] + [rng.choice(pos if label else neg)]
      rows.append(" ".join(words) + f"\t{label}")
    with open(os.path.join(directory, "sst2", f"{split}.tsv"), "w") as f:
      f.write("\n".join(rows) + "\n")
  lexicon = {"the": "die", "cat": "katze", "dog": "hund", "sees": "sieht", "a": "eine", "tree": "baum",
             "red": "rote", "big": "grosse"}
  for split, n in (("train", 300), ("val", 30), ("test", 30)):
    en = [f"the {rng.choice(['red', 'big'])} {rng.choice(['cat', 'dog'])} sees a tree" for _ in range(n)]
    for lang, lines in (("en", en), ("de", [" ".join(lexicon[w] for w in s.split()) for s in en])):
      with open(os.path.join(directory, "multi30k", f"{split}.{lang}"), "w") as f:
        f.write("\n".join(lines) + "\n\n")
  return directory


QUICK = {  # tiny models and budgets for --quick
    "lstm": ["model.d_embed=16", "model.d_hidden=16", "model.n_layers=1", "tokenizer.kind=word",
           "tokenizer.vocab_size=null"],
    "transformer": ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.context=32",
                    "tokenizer.kind=word", "tokenizer.vocab_size=null"],
    "budget": ["train.steps=20", "train.eval_every=10", "train.log_every=10", "data.batch_size=8", "task.max_len=32",
               "data.eval_batch_size=16"],
    "translate": ["task.max_len=32", "task.max_decode_len=12", "task.beam_size=2"],
    "pretrain": ["data.seq_len=16", "train.eval_batches=2"],
}


def evaluate(workdir: str, split: str) -> dict:
  proc = subprocess.run([sys.executable, "-m", "nlm_jax", "eval", "--workdir", workdir, "--split", split, "--json"],
                        cwd=ROOT, capture_output=True, text=True)
  if proc.returncode:
    raise SystemExit(f"nlm-jax eval failed for {workdir}:\n{proc.stderr[-2000:]}")
  return json.loads(proc.stdout)


def curve(workdir: str, key: str) -> list[tuple[int, float]]:
  from nlm_jax.plotting import read_metrics

  return [(r["step"], r[key]) for r in read_metrics(workdir) if key in r]


def run_task(task: str, arch: str, seeds: int, tmp: str, data: str, quick: bool) -> dict:
  recipe = os.path.join(CONFIGS, RECIPES[(task, arch)] + ".yaml")
  pre_recipe = os.path.join(CONFIGS, f"pretrain_{task}_{arch}.yaml")
  model = QUICK[arch] if quick else []
  budget = QUICK["budget"] if quick else []
  paths = ([f"data.files.train={data}/sst2/train.tsv", f"data.files.validation={data}/sst2/dev.tsv"]
           if task == "sst2" else
           [f"data.files.{s}={data}/multi30k/{f}" for s, f in (("train", "train"), ("validation", "val"),
                                                                ("test", "test"))])
  extra = QUICK["translate"] if quick and task == "multi30k" else []
  pretrained = os.path.join(tmp, f"pretrain_{task}_{arch}")
  nlm_jax_train(pretrained, [f"data.file={unlabelled_text(task, tmp, data)}", *model, *budget,
                             *(QUICK["pretrain"] if quick else [])], config=pre_recipe)
  info = TASKS[task]
  rows = {}
  for arm in ("scratch", "pretrained"):
    row = rows[arm] = {"score": [], "val_loss": [], "curves": []}
    for seed in range(1, seeds + 1):
      workdir = os.path.join(tmp, f"{task}_{arch}_{arm}_seed{seed}")
      init = [f"train.init_from={pretrained}"] if arm == "pretrained" else []
      nlm_jax_train(workdir, [*paths, *model, *budget, *extra, *init, f"seed={seed}"], config=recipe)
      with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)  # the final whole-validation-split numbers (and, translating, its BLEU)
      score = (100 * summary["final_validation_accuracy"] if task == "sst2"
               else evaluate(workdir, info["split"])["bleu"])  # Multi30k: BLEU of the test split
      row["score"].append(score)
      row["val_loss"].append(summary["final_validation_loss"])
      row["curves"].append(curve(workdir, "val_accuracy" if task == "sst2" else "val_loss"))
      print(f"{task} {arch} {arm} seed {seed}: {info['title']} {score:.2f}", flush=True)
  return rows


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="toy data, tiny models, a few steps (what CI runs)")
  ap.add_argument("--tasks", default="sst2,multi30k")
  ap.add_argument("--archs", default="lstm,transformer")
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--out", default=None, help="folder for results (default: beside this file; quick: a temp dir)")
  add_runs_argument(ap)
  args = ap.parse_args()
  tmp = scratch("pretrain_finetune-", args.runs)
  out = args.out or (tmp if args.quick else HERE)
  data = toy_data(os.path.join(tmp, "toy")) if args.quick else DATA
  results = {}
  for task in args.tasks.split(","):
    for arch in args.archs.split(","):
      if (task, arch) not in RECIPES:
        raise SystemExit(f"no recipe for {task} with {arch}; have: {', '.join(f'{t}/{a}' for t, a in RECIPES)}")
      results[f"{task}/{arch}"] = run_task(task, arch, args.seeds, tmp, data, args.quick)

  lines = ["| task | model | metric | from scratch | pretrained, then fine-tuned | gain | seeds' spread (max std) |",
           "|---|---|---|---:|---:|---:|---:|"]
  import statistics

  for key, rows in results.items():
    task, arch = key.split("/")
    s, p = rows["scratch"]["score"], rows["pretrained"]["score"]
    spread = max((statistics.stdev(x) for x in (s, p) if len(x) > 1), default=0.0)
    lines.append(f"| {task} | {arch} | {TASKS[task]['title']} | {mean_std(s, 2)} | {mean_std(p, 2)} | "
                 f"{statistics.mean(p) - statistics.mean(s):+.2f} | {spread:.2f} |")
  if args.quick:
    lines += ["", "QUICK MODE on toy data, not a result."]
  table = "\n".join(lines)
  print(table)
  write_results(out, table, {"quick": args.quick, "seeds": args.seeds, "results": results},
                update_readme=not args.quick)
  plot(results, out)


def plot(results: dict, out: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  for key, rows in results.items():
    task, arch = key.split("/")
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, color in (("scratch", "tab:blue"), ("pretrained", "tab:orange")):
      for j, c in enumerate(rows[arm]["curves"]):
        ax.plot([p[0] for p in c], [p[1] for p in c], color=color, alpha=0.8, label=arm if j == 0 else None)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("validation accuracy" if task == "sst2" else "validation loss (nats/target token)")
    ax.set_title(f"{task}, {arch}: from scratch vs pretrained")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{task}_{arch}_curves.png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
  main()
