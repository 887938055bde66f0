"""Representation learning: what the word embeddings of a WikiText-2 language model capture.

    python -m experiments.embeddings.run            # ~15 min on 2 CPU cores
    python -m experiments.embeddings.run --quick    # seconds, on a generated toy corpus

An LSTM language model (1 layer of 128, tied input and output embeddings) trains on WikiText-2
words by `nlm-jax train`, for each seed; its embedding matrix E (|V| × 128) is then probed, and so
is a random matrix of the same shape and scale (E at initialization, which is what an untrained
model has):
1. Category neighbours: for words of a few semantic categories (months, days, numbers, colours,
   countries, family, ordinals, directions), the fraction of each word's 5 nearest category words
   (cosine) that belong to its own category. Chance is about (n_c − 1) / (N − 1).
2. Analogies a : b :: c : ? by 3CosAdd (argmax of cos(x, b − a + c) over the 10,000 most frequent
   words, a, b and c excluded), for gender, nationality, plural, past tense and ordinal pairs.
3. Nearest neighbours of a few query words (first seed), and a 2-D PCA plot of the category words.
Writes results.json, results.md and embeddings_pca.png beside this file (or --out), and the
tables into README.md between its markers.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import statistics

import numpy as np

from experiments.common import add_runs_argument, mean_std, nlm_jax_train, scratch, train_in_process, write_results

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DATA = os.path.join(ROOT, "..", "shared", "data")

CATEGORIES = {
    "months": "January February March April May June July August September October November December".split(),
    "days": "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split(),
    "numbers": "two three four five six seven eight nine ten".split(),
    "colours": "red blue green black white yellow".split(),
    "countries": "England France Germany Spain Italy Japan China India Canada Australia".split(),
    "family": "father mother son daughter brother sister wife husband".split(),
    "ordinals": "first second third fourth fifth".split(),
    "directions": "north south east west".split(),
}
RELATIONS = {
    "gender": [("man", "woman"), ("king", "queen"), ("he", "she"), ("his", "her"), ("father", "mother"),
               ("son", "daughter"), ("brother", "sister"), ("husband", "wife"), ("boy", "girl")],
    "nationality": [("France", "French"), ("England", "English"), ("Germany", "German"), ("Spain", "Spanish"),
                    ("Italy", "Italian"), ("Japan", "Japanese"), ("China", "Chinese"), ("India", "Indian")],
    "plural": [("year", "years"), ("game", "games"), ("song", "songs"), ("album", "albums"), ("team", "teams"),
               ("player", "players"), ("city", "cities"), ("day", "days")],
    "past tense": [("play", "played"), ("release", "released"), ("join", "joined"), ("win", "won"),
                   ("lose", "lost"), ("begin", "began"), ("write", "wrote")],
    "ordinal": [("one", "first"), ("two", "second"), ("three", "third"), ("four", "fourth"), ("five", "fifth")],
}
QUERIES = ["king", "France", "Monday", "three", "guitar", "war", "played", "river"]
TOP_K, SEARCH = 5, 10_000


def unit(E: np.ndarray) -> np.ndarray:
  return E / np.maximum(np.linalg.norm(E, axis=1, keepdims=True), 1e-12)


def category_purity(E: np.ndarray, index: dict[str, int]) -> dict:
  """Per category and overall: mean fraction of a word's TOP_K nearest category words (cosine)
  in its own category; and the chance level of that fraction."""
  words = [(c, w) for c, ws in CATEGORIES.items() for w in ws if w in index]
  U = unit(E[[index[w] for _, w in words]])
  sims = U @ U.T
  np.fill_diagonal(sims, -np.inf)
  labels = np.array([c for c, _ in words])
  by_cat: dict[str, list[float]] = {}
  for i, (c, _) in enumerate(words):
    nearest = np.argsort(-sims[i])[:TOP_K]
    by_cat.setdefault(c, []).append(float(np.mean(labels[nearest] == c)))
  n = len(words)
  chance = statistics.mean((sum(labels == c) - 1) / (n - 1) for c in labels)
  return {"overall": statistics.mean(x for xs in by_cat.values() for x in xs),
          "by_category": {c: statistics.mean(xs) for c, xs in by_cat.items()}, "chance": chance, "words": n}


def analogies(E: np.ndarray, index: dict[str, int], search: int) -> dict:
  """3CosAdd accuracy per relation over every ordered pair of its pairs found in the vocabulary."""
  U = unit(E[:search])
  out = {}
  for rel, pairs in RELATIONS.items():
    pairs = [(a, b) for a, b in pairs if a in index and b in index and index[a] < search and index[b] < search]
    hits = []
    for (a, b), (c, d) in itertools.permutations(pairs, 2):
      target = U[index[b]] - U[index[a]] + U[index[c]]
      scores = U @ target
      scores[[index[a], index[b], index[c]]] = -np.inf
      hits.append(int(np.argmax(scores)) == index[d])
    out[rel] = {"accuracy": float(np.mean(hits)) if hits else None, "questions": len(hits)}
  total = sum(r["questions"] for r in out.values())
  out["all"] = {"accuracy": sum((r["accuracy"] or 0) * r["questions"] for r in out.values()) / max(total, 1),
                "questions": total}
  return out


def neighbours(E: np.ndarray, words: list[str], index: dict[str, int], search: int) -> dict[str, list[str]]:
  U = unit(E[:search])
  out = {}
  for q in QUERIES:
    if q in index and index[q] < search:
      scores = U @ U[index[q]]
      scores[index[q]] = -np.inf
      out[q] = [words[i] for i in np.argsort(-scores)[:TOP_K]]
  return out


def toy(directory: str) -> tuple[str, str]:
  """Sentences in which the category words fill the same slots, for --quick."""
  rng = random.Random(0)
  lines = []
  for _ in range(400):
    c = rng.choice(list(CATEGORIES))
    lines.append(f"the {c} word is {rng.choice(CATEGORIES[c])} and not {rng.choice(CATEGORIES[c])} .")
  paths = []
  for name, body in (("train.txt", lines), ("valid.txt", lines[:40])):
    paths.append(os.path.join(directory, name))
    with open(paths[-1], "w") as f:
      f.write("\n".join(body) + "\n")
  return paths[0], paths[1]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="a toy corpus and a few steps (seconds; what CI runs)")
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--steps", type=int, default=None, help="training steps (default 800; quick: 10)")
  ap.add_argument("--out", default=None, help="folder for results (default: beside this file; quick: a temp dir)")
  add_runs_argument(ap)
  args = ap.parse_args()
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.ERROR)
  import flax.linen as nn
  import jax

  from nlm_jax import models
  from nlm_jax.training import trainer

  tmp = scratch("embeddings-", args.runs)
  train_in_process(args.quick)  # quick: every run in this process, one after the other
  out = args.out or (tmp if args.quick else HERE)
  steps = args.steps or (10 if args.quick else 800)
  if args.quick:
    train_f, valid_f = toy(tmp)
    data = [f"data.files.train={train_f}", f"data.files.validation={valid_f}", "data.batch_size=4",
            f"data.cache_dir={tmp}/cache"]
    size = ["model.d_embed=16", "model.d_hidden=16"]
  else:
    data = [f"data.files.train={DATA}/wikitext-2/train.txt", f"data.files.validation={DATA}/wikitext-2/valid.txt",
            "data.batch_size=20"]
    size = ["model.d_embed=128", "model.d_hidden=128"]
  common = ["data.source=text", "tokenizer.kind=word", "data.batching=streams", "data.seq_len=35",
            "model.arch=lstm", "model.n_layers=1", "model.tie_embeddings=true", *size, "optim.name=adamw",
            "optim.lr=3e-3", "optim.min_lr=3e-4", "optim.weight_decay=0.01", "optim.clip_norm=0.5",
            "optim.schedule=warmup_cosine", f"optim.warmup_steps={max(steps // 20, 1)}", f"train.steps={steps}",
            f"train.eval_every={steps}", "train.eval_batches=20", f"train.log_every={max(steps // 10, 1)}"]

  probes = {"trained": [], "random": []}
  first = None
  for seed in range(1, args.seeds + 1):
    workdir = os.path.join(tmp, f"lstm_seed{seed}")
    wall = nlm_jax_train(workdir, [*data, *common, f"seed={seed}"])
    run, params, _ = trainer.load_run(workdir)
    words = run.tokenizer.words
    index = {w: i for i, w in enumerate(words)}
    search = min(SEARCH, len(words))
    initial = nn.unbox(models.build(run.model_cfg).init(jax.random.key(seed), np.zeros((1, 4), np.int32))["params"])
    for kind, p in (("trained", params), ("random", initial)):
      E = np.asarray(p["embed"]["embedding"], np.float64)
      probes[kind].append({"purity": category_purity(E, index), "analogies": analogies(E, index, search), "search": search,
                           "val_ppl": run_summary_ppl(workdir) if kind == "trained" else None, "train_s": wall})
    if first is None:
      first = {"neighbours": {k: neighbours(np.asarray(p["embed"]["embedding"], np.float64), words, index, search)
                              for k, p in (("trained", params), ("random", initial))},
               "pca": pca_points(np.asarray(params["embed"]["embedding"], np.float64), index)}
    t = probes["trained"][-1]
    print(f"seed {seed}: validation perplexity {t['val_ppl']:.1f}, category purity {t['purity']['overall']:.2f} "
          f"(random {probes['random'][-1]['purity']['overall']:.2f}), analogies "
          f"{t['analogies']['all']['accuracy']:.3f} ({wall:.0f} s)", flush=True)

  table = report(probes, first, args, steps)
  print(table)
  write_results(out, table, {"quick": args.quick, "seeds": args.seeds, "steps": steps, "probes": probes,
                             "first_seed": first}, update_readme=not args.quick)
  plot(first["pca"], os.path.join(out, "embeddings_pca.png"))


def run_summary_ppl(workdir: str) -> float:
  import json

  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)["final_validation_perplexity"]


def pca_points(E: np.ndarray, index: dict[str, int]) -> list[dict]:
  words = [(c, w) for c, ws in CATEGORIES.items() for w in ws if w in index]
  X = E[[index[w] for _, w in words]]
  X = X - X.mean(axis=0)
  _, _, Vt = np.linalg.svd(X, full_matrices=False)
  Y = X @ Vt[:2].T
  return [{"word": w, "category": c, "x": float(y[0]), "y": float(y[1])} for (c, w), y in zip(words, Y)]


def report(probes: dict, first: dict, args, steps: int) -> str:
  def col(kind, get):
    return mean_std([get(p) for p in probes[kind]], 3)

  t0 = probes["trained"][0]
  d, B = (16, 4) if args.quick else (128, 20)
  lines = [f"LSTM language model (1 × {d}, tied embeddings), {steps} steps of {B} × 35 words; validation "
           f"perplexity {mean_std([p['val_ppl'] for p in probes['trained']], 1)} (mean ± std over {args.seeds} seeds).",
           "", "| probe | learned embeddings | random (initialization) | chance |", "|---|---:|---:|---:|",
           f"| category neighbours: share of the {TOP_K} nearest that share the category ({t0['purity']['words']} words) "
           f"| {col('trained', lambda p: p['purity']['overall'])} | {col('random', lambda p: p['purity']['overall'])} "
           f"| {t0['purity']['chance']:.3f} |"]
  for c in CATEGORIES:
    if c in t0["purity"]["by_category"]:
      lines.append(f"| … {c} | {col('trained', lambda p: p['purity']['by_category'][c])} | "
                   f"{col('random', lambda p: p['purity']['by_category'][c])} | |")
  for rel in [*RELATIONS, "all"]:
    q = t0["analogies"][rel]["questions"]
    if q:
      lines.append(f"| analogies, {rel} (3CosAdd, {q} questions) | "
                   f"{col('trained', lambda p: p['analogies'][rel]['accuracy'])} | "
                   f"{col('random', lambda p: p['analogies'][rel]['accuracy'])} | {1 / t0['search']:.4f} |")
  lines += ["", f"Nearest neighbours (cosine, the {t0['search']:,} most frequent words; seed 1):", "",
            "| word | learned | random |", "|---|---|---|"]
  for q, ns in first["neighbours"]["trained"].items():
    lines.append(f"| {q} | {', '.join(ns)} | {', '.join(first['neighbours']['random'][q])} |")
  if args.quick:
    lines += ["", "QUICK MODE on a toy corpus, not a result."]
  return "\n".join(lines)


def plot(points: list[dict], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8, 6))
  cats = list(dict.fromkeys(p["category"] for p in points))
  for i, c in enumerate(cats):
    ps = [p for p in points if p["category"] == c]
    ax.scatter([p["x"] for p in ps], [p["y"] for p in ps], color=f"C{i}", label=c, s=18)
    for p in ps:
      ax.annotate(p["word"], (p["x"], p["y"]), fontsize=7, color=f"C{i}", xytext=(2, 2), textcoords="offset points")
  ax.set_title("Learned word embeddings (WikiText-2 LSTM, seed 1): first two principal components")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
