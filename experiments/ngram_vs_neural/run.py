"""n-gram against neural language model (Bengio et al. 2003) on WikiText-2, word level.

    python -m experiments.ngram_vs_neural.run             # the experiment (~30 min on 2 CPU cores)
    python -m experiments.ngram_vs_neural.run --quick     # seconds, on a generated toy corpus

Models: interpolated modified Kneser–Ney n-grams (n = 3, 5; `nlm_jax.ngram`), Bengio's NPLM
(n = 5, m = 60, h = 100) with and without direct connections, trained by `nlm-jax train`
(`experiments/configs/wikitext2_fnn.yaml`) for each seed, and the mixture
λ·P_NPLM + (1 − λ)·P_KN5 with λ chosen on the validation split, as in the paper. Every model
scores the same tokens of the test stream (the run's own word tokenizer for all of them).
Writes results.json, results.md, test_perplexity.png beside this file (or --out), and the table
into README.md between its markers.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import numpy as np

from experiments.common import add_runs_argument, mean_std, nlm_jax_train, scratch, train_in_process, write_results

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
RECIPE = os.path.join(ROOT, "experiments", "configs", "wikitext2_fnn.yaml")
LAMBDAS = np.linspace(0.0, 1.0, 21)


def toy_corpus(directory: str) -> list[str]:
  """train/valid/test files of a small grammar, for --quick."""
  rng = random.Random(0)
  words = {"subj": ["cat", "dog", "bird"], "verb": ["sat", "ran", "flew"], "prep": ["on", "under", "over"],
           "adj": ["red", "big", "small"], "obj": ["mat", "tree", "house"]}
  paths = []
  for name, n in (("train", 400), ("valid", 60), ("test", 60)):
    lines = [f"the {rng.choice(words['adj'])} {rng.choice(words['subj'])} {rng.choice(words['verb'])} "
             f"{rng.choice(words['prep'])} a {rng.choice(words['adj'])} {rng.choice(words['obj'])}" for _ in range(n)]
    paths.append(os.path.join(directory, f"{name}.txt"))
    with open(paths[-1], "w") as f:
      f.write("\n".join(lines) + "\n")
  return paths


def train_fnn(workdir: str, direct: bool, seed: int, steps: int, extra: list[str]) -> float:
  """`nlm-jax train` of the NPLM recipe; returns its wall time."""
  return nlm_jax_train(workdir, [f"model.direct={str(direct).lower()}", f"seed={seed}", f"train.steps={steps}",
                                 *extra], config=RECIPE)


def ppl(log_p: np.ndarray) -> float:
  return float(np.exp(-np.mean(log_p)))


def mixture(lp_a_val, lp_b_val, lp_a_test, lp_b_test) -> tuple[float, float]:
  """(λ, test perplexity) of λ P_a + (1 − λ) P_b with λ maximizing the validation likelihood."""
  def mix(lam, a, b):
    return np.logaddexp(np.log(lam + 1e-300) + a, np.log(1 - lam + 1e-300) + b)

  lam = max(LAMBDAS, key=lambda l: np.mean(mix(l, lp_a_val, lp_b_val)))
  return float(lam), ppl(mix(lam, lp_a_test, lp_b_test))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="a toy corpus and a few steps (seconds; what CI runs)")
  ap.add_argument("--steps", type=int, default=None, help="NPLM training steps (default 600; quick: 10)")
  ap.add_argument("--vocab", type=int, default=10_000, help="word vocabulary of every model (the most frequent)")
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--out", default=None, help="folder for results (default: beside this file; quick: a temp dir)")
  add_runs_argument(ap)
  args = ap.parse_args()

  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax's notes on read-only checkpoint managers
  from nlm_jax.ngram import KneserNey
  import jax

  from nlm_jax.scoring import token_log_probs
  from nlm_jax.training import trainer

  tmp = scratch("ngram_vs_neural-", args.runs)
  train_in_process(args.quick)  # quick: every run in this process, one after the other
  out = args.out or (tmp if args.quick else HERE)
  steps = args.steps or (10 if args.quick else 600)
  # The 10,000 most frequent words (the rest <unk>) for every model, n-grams included: the NPLM's
  # output layer (and direct connections) cost ∝ |V|, and at 33,278 types six runs of a useful
  # length do not fit ~30 minutes on 2 CPU cores. A higher peak rate for the short budget.
  extra = [f"tokenizer.vocab_size={args.vocab}", "optim.lr=3e-3"]
  if args.quick:
    train_f, valid_f, test_f = toy_corpus(tmp)
    extra = ["tokenizer.vocab_size=null", f"data.files.train={train_f}", f"data.files.validation={valid_f}",
             f"data.files.test={test_f}",
             "model.d_embed=8", "model.d_hidden=16", "data.batch_size=4", "data.seq_len=8", "data.eval_batch_size=4",
             "train.eval_every=10", "train.eval_batches=2", "train.log_every=10", f"data.cache_dir={tmp}/cache"]

  rows: dict[str, dict] = {}
  fnn_scores: dict[tuple[bool, int], dict] = {}
  for direct in (True, False):
    for seed in range(1, args.seeds + 1):
      workdir = os.path.join(tmp, f"fnn_direct{int(direct)}_seed{seed}")
      seconds = train_fnn(workdir, direct, seed, steps, extra)
      run, params, _ = trainer.load_run(workdir)
      scores = {split: token_log_probs(run.model, params, run.corpus.tokens(split)) for split in ("validation", "test")}
      fnn_scores[(direct, seed)] = scores
      name = f"NPLM n=5, direct connections {'on' if direct else 'off'}"
      n_params = int(sum(x.size for x in jax.tree.leaves(params)))
      row = rows.setdefault(name, {"test_ppl": [], "params": n_params, "train_s": []})
      row["test_ppl"].append(ppl(scores["test"]))
      row["train_s"].append(seconds)
      print(f"{name}, seed {seed}: test perplexity {row['test_ppl'][-1]:.1f} ({seconds:.0f} s)", flush=True)

  tokens = {split: run.corpus.tokens(split) for split in ("train", "validation", "test")}
  eos = run.tokenizer.eos_id
  kn_scores = {}
  for n in (3, 5):
    t = time.perf_counter()
    kn = KneserNey(n, run.tokenizer.vocab_size, bos_id=eos, eos_id=eos).fit([tokens["train"]])
    # Score the tokens the neural models score: w_1..w_{N−1} (drop w_0 and the EOS paddings).
    kn_scores[n] = {s: kn.log_prob([tokens[s]])[1:len(tokens[s])] for s in ("validation", "test")}
    seconds = time.perf_counter() - t
    rows[f"Kneser–Ney n={n} (modified, interpolated)"] = {
        "test_ppl": [ppl(kn_scores[n]["test"])], "params": int(sum(kn.num_ngrams())), "train_s": [seconds],
        "params_are": "distinct n-grams"}
    print(f"KN n={n}: test perplexity {rows[f'Kneser–Ney n={n} (modified, interpolated)']['test_ppl'][0]:.1f}",
          flush=True)

  for direct in (True, False):
    name = f"mixture NPLM (direct {'on' if direct else 'off'}) + KN n=5, λ on validation"
    row = rows.setdefault(name, {"test_ppl": [], "lambda": [], "params": None, "train_s": []})
    for seed in range(1, args.seeds + 1):
      s = fnn_scores[(direct, seed)]
      lam, test_ppl = mixture(s["validation"], kn_scores[5]["validation"], s["test"], kn_scores[5]["test"])
      row["test_ppl"].append(test_ppl)
      row["lambda"].append(lam)

  best_kn = min(rows[k]["test_ppl"][0] for k in rows if k.startswith("Kneser"))
  lines = ["| model | test perplexity | parameters | training time |", "|---|---:|---:|---:|"]
  for name, r in rows.items():
    params = "—" if r["params"] is None else f"{r['params']:,}" + (" n-grams" if r.get("params_are") else "")
    train_s = "—" if not r["train_s"] else f"{statistics.mean(r['train_s']):.0f} s"
    lam = r.get("lambda")
    extra_txt = f" (λ = {mean_std(lam, 2)})" if lam else ""
    lines.append(f"| {name}{extra_txt} | {mean_std(r['test_ppl'], 1)} | {params} | {train_s} |")
  best_neural = min(statistics.mean(r["test_ppl"]) for k, r in rows.items() if not k.startswith("Kneser"))
  lines += ["", f"Best neural or mixed model against the best n-gram model: "
            f"{100 * (best_neural / best_kn - 1):+.1f}% test perplexity (Bengio et al. on Brown: −24%). "
            f"{args.seeds} seeds, {steps} training steps per NPLM, vocabulary {run.tokenizer.vocab_size:,} words"
            + (" — QUICK MODE on a toy corpus, not a result." if args.quick else ".")]
  table = "\n".join(lines)
  print(table)

  write_results(out, table, {"steps": steps, "seeds": args.seeds, "quick": args.quick, "rows": rows},
                update_readme=not args.quick)
  plot(rows, os.path.join(out, "test_perplexity.png"))


def plot(rows: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(rows)
  means = [statistics.mean(rows[n]["test_ppl"]) for n in names]
  stds = [statistics.stdev(rows[n]["test_ppl"]) if len(rows[n]["test_ppl"]) > 1 else 0.0 for n in names]
  fig, ax = plt.subplots(figsize=(9, 4.5))
  ax.barh(range(len(names)), means, xerr=stds, color=["tab:blue" if n.startswith("Kneser") else "tab:orange"
                                                      for n in names])
  ax.set_yticks(range(len(names)), [n.replace(", λ on validation", "") for n in names], fontsize=8)
  ax.invert_yaxis()
  ax.set_xlabel("test perplexity (lower is better; mean ± std over seeds)")
  ax.set_title("WikiText-2, word level: n-gram against neural LM")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
