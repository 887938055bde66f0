"""Helpers shared by the training, data and CLI tests: a generated corpus and an in-process CLI."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random

import numpy as np

from nlm_jax import cli

WORDS = ("the cat dog bird sat ran flew on under over a red big small mat tree house "
         "and then saw it").split()


def write_corpus(path, n_lines: int = 300, seed: int = 0) -> str:
  """Lines of a tiny grammar ('the big cat sat on a red mat'), learnable in a few steps."""
  rng = random.Random(seed)
  subj, verb, prep, adj = ["cat", "dog", "bird"], ["sat", "ran", "flew"], ["on", "under", "over"], ["red", "big", "small"]
  lines = []
  for _ in range(n_lines):
    lines.append(f"the {rng.choice(adj)} {rng.choice(subj)} {rng.choice(verb)} {rng.choice(prep)} "
                 f"a {rng.choice(adj)} {rng.choice(['mat', 'tree', 'house'])}")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return str(path)


ARCH_OVERRIDES = {
    "transformer": ["model.arch=transformer", "model.d_model=32", "model.n_heads=4", "model.n_layers=2",
                    "model.context=32"],
    "lstm": ["model.arch=lstm", "model.d_embed=32", "model.d_hidden=32", "model.n_layers=2"],
    "rnn": ["model.arch=rnn", "model.d_embed=32", "model.d_hidden=32", "model.n_layers=2"],
    "fnn": ["model.arch=fnn", "model.context=4", "model.d_embed=16", "model.d_hidden=32"],
}


def overrides(workdir, corpus, arch="transformer", batching="windows", steps=30, **extra) -> list[str]:
  out = [f"workdir={workdir}", f"data.file={corpus}", f"data.batching={batching}", "data.batch_size=8",
         "data.seq_len=16", f"train.steps={steps}", "train.eval_every=10", "train.log_every=5",
         "train.eval_batches=4", "train.progress=false", "optim.name=adamw", "optim.lr=3e-3",
         "seed=3", *ARCH_OVERRIDES[arch]]
  out += [f"{k.replace('__', '.')}={v}" for k, v in extra.items()]
  return out


def run_cli(*argv) -> tuple[int, str, str]:
  """`nlm-jax ARGV` in this process: (exit code, stdout, stderr)."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = cli.main([str(a) for a in argv])
  return code, out.getvalue(), err.getvalue()


def train(*argv) -> dict:
  code, out, err = run_cli("train", *argv)
  assert code == 0, err
  return json.loads(out[out.index("{"):])


def metrics(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def final_state(workdir, step=None):
  """The whole train state saved at `step` (default: latest), as NumPy arrays."""
  import orbax.checkpoint as ocp

  from nlm_jax.training.checkpoint import Checkpoints

  import jax

  ckpts = Checkpoints(str(workdir), read_only=True)
  step = ckpts.latest_step() if step is None else step
  meta = ckpts.manager.item_metadata(step)["state"]
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # whatever mesh saved it
  restore_args = jax.tree.map(lambda m: ocp.ArrayRestoreArgs(sharding=device, global_shape=m.shape, dtype=m.dtype),
                              meta.tree if hasattr(meta, "tree") else meta)
  state = ckpts.manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(restore_args=restore_args)))["state"]
  ckpts.close()
  return state


def assert_trees_equal(a, b):
  import jax

  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) > 0
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def write_sentiment(directory, n_train: int = 400, n_dev: int = 100, seed: int = 0) -> dict[str, str]:
  """GLUE-style TSV files (train.tsv, dev.tsv: a header, then sentence<TAB>label) whose label is
  set by the one sentiment word in each sentence, and lm.txt: the training sentences as raw text
  (for pretraining on the same vocabulary)."""
  rng = random.Random(seed)
  pos, neg = "good great fine lovely superb".split(), "bad awful poor dull terrible".split()
  filler = "the movie was a film plot acting very quite and it".split()
  paths = {}
  for split, n in (("train", n_train), ("dev", n_dev)):
    rows, sentences = ["sentence\tlabel"], []
    for _ in range(n):
      label = rng.randint(0, 1)
      words = [rng.choice(filler) for _ in range(rng.randint(2, 20))]
      words.insert(rng.randrange(len(words) + 1), rng.choice(pos if label else neg))
      sentences.append(" ".join(words))
      rows.append(f"{sentences[-1]}\t{label}")
    paths[split] = os.path.join(directory, f"{split}.tsv")
    with open(paths[split], "w") as f:
      f.write("\n".join(rows) + "\n")
    if split == "train":
      paths["lm"] = os.path.join(directory, "lm.txt")
      with open(paths["lm"], "w") as f:
        f.write("\n".join(sentences) + "\n")
  return paths
