"""Positional encodings: sinusoidal, learned, rotary, none — validation loss at the trained length,
and beyond it.

    python -m experiments.positional_encodings.run            # ~25 min on 2 CPU cores
    python -m experiments.positional_encodings.run --quick    # seconds, on a generated toy text

A 4-layer, 4-head, 128-wide character Transformer on Tiny Shakespeare (nanoGPT's 90/10 split of
input.txt), trained by `nlm-jax train` on windows of 64 characters, once per encoding and seed.
Each trained model then scores the validation text cut into consecutive windows of 64, 128 and
256 characters (`nlm_jax.scoring.token_log_probs`, every window from an empty context): at 64 the
models are compared where they were trained; at 128 and 256 the positions 64..255 were never seen
in training. A learned position table has no rows past 64, so that model is scored at 64 only.
Writes results.json, results.md and loss_by_position.png beside this file (or --out), and the
table into README.md between its markers.
"""

from __future__ import annotations

import argparse
import os
import statistics

import numpy as np

from experiments.common import add_runs_argument, mean_std, nlm_jax_train, scratch, train_in_process, write_results

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
RECIPE = os.path.join(ROOT, "experiments", "configs", "shakespeare_char_transformer.yaml")
TEXT = os.path.join(ROOT, "..", "shared", "data", "tiny_shakespeare", "input.txt")
ENCODINGS = ("sinusoidal", "learned", "rotary", "none")
TRAIN_LEN = 64
EVAL_LENS = (64, 128, 256)


def train(workdir: str, encoding: str, seed: int, steps: int, extra: list[str]) -> float:
  context = TRAIN_LEN if encoding == "learned" else max(EVAL_LENS)  # T_max: the table's rows, if any
  return nlm_jax_train(workdir, ["data.source=text", f"model.pos_encoding={encoding}", f"model.context={context}",
                                 f"data.seq_len={TRAIN_LEN}", f"seed={seed}", f"train.steps={steps}", *extra],
                       config=RECIPE)


def loss_by_position(model, params, tokens: np.ndarray, length: int) -> np.ndarray:
  """Mean NLL (nats) at each position 0..length−2 of consecutive windows of `length` tokens."""
  from nlm_jax.scoring import token_log_probs

  n_windows = len(tokens) // length
  nll = np.zeros(length - 1)
  for w in range(n_windows):
    nll += -token_log_probs(model, params, tokens[w * length:(w + 1) * length], chunk=length)
  return nll / n_windows


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="a toy text and a few steps (seconds; what CI runs)")
  ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 1000; quick: 10)")
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--eval-chars", type=int, default=None,
                  help="validation characters scored per length (default 32,768; quick: 2,048)")
  ap.add_argument("--out", default=None, help="folder for results (default: beside this file; quick: a temp dir)")
  add_runs_argument(ap)
  args = ap.parse_args()

  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.ERROR)
  from nlm_jax.training import trainer

  tmp = scratch("positional_encodings-", args.runs)
  train_in_process(args.quick)  # quick: every run in this process, one after the other
  out = args.out or (tmp if args.quick else HERE)
  steps = args.steps or (10 if args.quick else 1000)
  eval_chars = args.eval_chars or (2048 if args.quick else 32768)
  text = TEXT
  extra = []
  if args.quick:
    text = os.path.join(tmp, "toy.txt")
    rng = np.random.default_rng(0)
    with open(text, "w") as f:  # a period-7 pattern with noise: positions and content both matter
      f.write("".join("abcdefg"[i % 7] if rng.random() > 0.1 else "xyz"[rng.integers(3)] for i in range(40_000)))
    extra = ["model.d_model=16", "model.n_heads=2", "model.n_layers=1", "data.batch_size=4", "train.eval_every=10",
             "train.eval_batches=2", "train.log_every=10", f"data.cache_dir={tmp}/cache"]
  elif not os.path.exists(text):
    raise SystemExit(f"{text} not found (the experiment needs ../shared/data/tiny_shakespeare)")
  extra.append(f"data.file={text}")

  results: dict[str, dict] = {}
  curves: dict[str, np.ndarray] = {}
  for encoding in ENCODINGS:
    r = results[encoding] = {str(L): [] for L in EVAL_LENS} | {"beyond": [], "train_s": []}
    curve = []
    for seed in range(1, args.seeds + 1):
      workdir = os.path.join(tmp, f"{encoding}_seed{seed}")
      r["train_s"].append(train(workdir, encoding, seed, steps, extra))
      run, params, _ = trainer.load_run(workdir)
      val = run.corpus.tokens(run.cfg.data.eval_split)[:eval_chars]
      for L in EVAL_LENS:
        if encoding == "learned" and L > TRAIN_LEN:
          continue
        nll = loss_by_position(run.model, params, val, L)
        r[str(L)].append(float(nll.mean()))
        if L == max(EVAL_LENS):
          r["beyond"].append(float(nll[TRAIN_LEN:].mean()))  # read at input positions 64..255: never trained
          curve.append(nll)
        elif encoding == "learned" and L == TRAIN_LEN:
          curve.append(nll)
      print(f"{encoding} seed {seed}: " + ", ".join(f"L={L} {r[str(L)][-1]:.4f}" for L in EVAL_LENS if r[str(L)]),
            flush=True)
    curves[encoding] = np.mean(curve, axis=0)

  def cell(xs):
    return mean_std(xs, 4)

  lines = ["| encoding | val loss, windows of 64 (trained) | windows of 128 | windows of 256 | "
           "loss at positions 64–255 | training time |", "|---|---:|---:|---:|---:|---:|"]
  for enc, r in results.items():
    lines.append(f"| {enc} | {cell(r['64'])} | {cell(r['128'])} | {cell(r['256'])} | {cell(r['beyond'])} | "
                 f"{statistics.mean(r['train_s']):.0f} s |")
  lines += ["", f"Nats per character, mean ± std over {args.seeds} seeds; {steps} steps of batch "
            f"{run.cfg.data.batch_size} × {TRAIN_LEN} per run; "
            f"{eval_chars:,} validation characters per length."
            + (" QUICK MODE on a toy text, not a result." if args.quick else "")]
  table = "\n".join(lines)
  print(table)
  write_results(out, table, {"steps": steps, "seeds": args.seeds, "quick": args.quick, "eval_chars": eval_chars,
                             "results": results, "loss_by_position": {k: v.tolist() for k, v in curves.items()}},
                update_readme=not args.quick)
  plot(curves, os.path.join(out, "loss_by_position.png"))


def plot(curves: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8, 4.5))
  for enc, nll in curves.items():
    ax.plot(np.arange(1, len(nll) + 1), nll, label=enc)
  ax.axvline(TRAIN_LEN, color="grey", linestyle=":", label="trained length")
  ax.set_xlabel("position in the window (characters of context + 1)")
  ax.set_ylabel("validation loss (nats/char), mean over windows and seeds")
  ax.set_title("Loss by position: inside and beyond the trained length")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
