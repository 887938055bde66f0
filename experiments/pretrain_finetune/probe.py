"""Linear probe: how much sentiment a trained body's features hold, without fine-tuning it.

    python -m experiments.pretrain_finetune.probe runs/pf/lm runs/pf/sst2_lstm_scratch_seed1 ...
    python -m experiments.pretrain_finetune.probe --random runs/pf/lm    # the same body, untrained
    python -m experiments.pretrain_finetune.probe --similar good/bad,good/great runs/pf/lm ...

For each run (a language model or a classifier: its body is read), every SST-2 text is read by the
body as a classifier reads it ([start] + words, from the zero state) and pooled as
`task.pooling=concat` pools it ([last; mean; max] of the final hidden states). An L2-regularised
logistic regression is then fitted on the standardised features of the training phrases by Newton's
method, its penalty chosen on a held-out tenth of them; printed: that held-out accuracy and the
SST-2 dev accuracy. The body never changes, so the numbers say what pretraining put in the features,
apart from what fine-tuning does with them. `--similar` prints instead the cosine similarity of the
input embeddings of word pairs: whether the body places antonyms apart.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from nlm_jax import models
from nlm_jax.tasks import classify
from nlm_jax.training import trainer

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "data", "sst2")
PENALTIES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # × the number of examples


def read_tsv(path: str) -> tuple[list[str], np.ndarray]:
  """(texts, 0/1 labels) of a GLUE SST-2 TSV file (columns 'sentence' and 'label')."""
  texts, labels = classify.read_tsv(path, "sentence", "label")
  return texts, np.asarray([int(label) for label in labels], np.int32)


def features(workdir: str, texts: list[str], random: bool = False, step: int | None = None, rows: int = 256,
             max_len: int = 64) -> np.ndarray:
  """(N, 3H): the concat-pooled final hidden states of the run's body (at `step`, default its
  last checkpoint; `random`: at its initialisation) for each text."""
  run, params, _ = trainer.load_run(workdir, step)
  body = models.build(run.model_cfg)
  params = params.get("body", params)  # a classifier's body, or a language model
  if random:
    params = body.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32), None)["params"]

  @jax.jit
  def pooled(params, inputs_BxT, mask_BxT):
    out = body.apply({"params": params}, inputs_BxT, None, deterministic=True, logits=False)
    h_BxTxH = out.hidden.astype(jnp.float32)
    return classify.pool(h_BxTxH, mask_BxT, "concat")

  ids = classify.encode_texts(run.tokenizer, texts, max_len)
  order = np.argsort([len(x) for x in ids], kind="stable")
  out = None
  for i in range(0, len(ids), rows):  # texts of similar length together: little padding
    chunk = order[i:i + rows]
    batch = classify.collate([ids[j] for j in chunk], np.zeros(len(chunk), np.int32), rows, max_len)
    feats = np.asarray(pooled(params, batch["inputs"], batch["mask"]), np.float64)[:len(chunk)]
    out = np.zeros((len(ids), feats.shape[1])) if out is None else out
    out[chunk] = feats
  return out


def logistic_regression(x: np.ndarray, y: np.ndarray, penalty: float, iters: int = 30) -> np.ndarray:
  """Weights (D+1,) minimising the mean logistic loss + penalty/2 ‖w‖² (bias not penalised), by Newton."""
  x1 = np.concatenate([x, np.ones((len(x), 1))], 1)
  w = np.zeros(x1.shape[1])
  reg = np.full(x1.shape[1], penalty)
  reg[-1] = 0.0
  for _ in range(iters):
    p = 1.0 / (1.0 + np.exp(-(x1 @ w)))
    grad = x1.T @ (p - y) / len(y) + reg * w
    hess = (x1 * (p * (1 - p))[:, None]).T @ x1 / len(y) + np.diag(reg + 1e-10)
    step = np.linalg.solve(hess, grad)
    w -= step
    if np.abs(step).max() < 1e-8:
      break
  return w


def accuracy(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
  return float(((x @ w[:-1] + w[-1] > 0) == (y == 1)).mean())


def probe(workdir: str, data: str, random: bool = False, step: int | None = None) -> dict:
  train_texts, train_y = read_tsv(os.path.join(data, "train.tsv"))
  dev_texts, dev_y = read_tsv(os.path.join(data, "dev.tsv"))
  x = features(workdir, train_texts + dev_texts, random, step)
  x_train, x_dev = x[:len(train_texts)], x[len(train_texts):]
  mean, std = x_train.mean(0), x_train.std(0) + 1e-8
  x_train, x_dev = (x_train - mean) / std, (x_dev - mean) / std
  held = np.random.default_rng(0).permutation(len(train_y))
  held, fit = held[:len(held) // 10], held[len(held) // 10:]
  scores = {c: accuracy(logistic_regression(x_train[fit], train_y[fit], c), x_train[held], train_y[held])
            for c in PENALTIES}
  best = max(PENALTIES, key=lambda c: scores[c])
  w = logistic_regression(x_train, train_y, best)
  return {"penalty": best, "held_out": scores[best], "train": accuracy(w, x_train, train_y),
          "dev": accuracy(w, x_dev, dev_y)}


def similarities(workdir: str, pairs: list[tuple[str, str]]) -> list[float]:
  """Cosine similarity of the body's input embeddings of each pair of words (one token each)."""
  run, params, _ = trainer.load_run(workdir)
  table = np.asarray(params.get("body", params)["embed"]["embedding"], np.float64)

  def vector(word: str) -> np.ndarray:
    ids = [i for i in run.tokenizer.encode(word) if i != getattr(run.tokenizer, "eos_id", None)]  # a word: its line's end
    if len(ids) != 1 or ids[0] == getattr(run.tokenizer, "unk_id", None):
      raise SystemExit(f"error: {word!r} is not one known token of {workdir}'s tokenizer")
    return table[ids[0]]

  return [float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in
          ((vector(u), vector(v)) for u, v in pairs)]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("runs", nargs="+", help="run directories (language models or classifiers)")
  ap.add_argument("--random", action="store_true", help="probe the runs' bodies at their initialisation instead")
  ap.add_argument("--step", type=int, default=None, help="the checkpoint to read (default: the last)")
  ap.add_argument("--data", default=DATA, help="the folder of SST-2's train.tsv and dev.tsv")
  ap.add_argument("--similar", default=None, metavar="A/B,C/D",
                  help="print the cosine similarities of these word pairs' embeddings instead of probing")
  args = ap.parse_args()
  if args.similar:
    pairs = [tuple(pair.split("/")) for pair in args.similar.split(",")]
    print("| run | " + " | ".join(f"{a} / {b}" for a, b in pairs) + " |\n|---|" + "---:|" * len(pairs))
    for workdir in args.runs:
      print(f"| {workdir} | " + " | ".join(f"{c:.2f}" for c in similarities(workdir, pairs)) + " |", flush=True)
    return
  print("| run | body | penalty | train | held-out train | SST-2 dev |\n|---|---|---:|---:|---:|---:|")
  for workdir in args.runs:
    r = probe(workdir, args.data, args.random, args.step)
    body = "initial" if args.random else f"step {args.step}" if args.step is not None else "trained"
    print(f"| {workdir} | {body} | {r['penalty']:g} | {100 * r['train']:.2f} | "
          f"{100 * r['held_out']:.2f} | {100 * r['dev']:.2f} |", flush=True)


if __name__ == "__main__":
  main()
