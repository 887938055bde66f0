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
and validation loss; mean ± std over seeds (SST-2: also each arm's seeds as one ensemble, their
class probabilities averaged: `nlm-jax eval` with several --workdir), and the validation curves of
both arms as a PNG.
Writes results.json, results.md and <task>_curves.png beside this file (or --out), and the table
into README.md between its markers.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import hashlib
import json
import os
import random
import re
import statistics
import time
from typing import Callable, NamedTuple

from experiments.common import (ROOT, add_runs_argument, mean_std, nlm_jax_command, scratch, train_in_process,
                                train_summary, write_results)

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(ROOT, "..", "shared", "data")
CONFIGS = os.path.join(ROOT, "experiments", "configs")
TASKS = {"sst2": {"metric": "accuracy", "split": "validation", "title": "SST-2 dev accuracy (%)"},
         "multi30k": {"metric": "bleu", "split": "test", "title": "Multi30k en→de test BLEU"}}
RECIPES = {("sst2", "lstm"): "sst2_lstm", ("sst2", "transformer"): "sst2_transformer",
           ("multi30k", "lstm"): "multi30k_en_de_lstm", ("multi30k", "transformer"): "multi30k_en_de_transformer"}


def unlabelled_text(task: str, directory: str, data: str) -> str:
  """The pretraining text of a task, one sentence or paragraph per line. SST-2: WikiText-2's
  training text, lowercased and without its headings (SST-2 is lowercased), when `data` holds
  wikitext-2/train.txt, then SST-2's training sentences; Multi30k: its English and German training
  lines shuffled together (no alignment: the only German text there is). SST-2's training
  sentences alone go to sst2_train_text.txt beside it (for `tokenizer.include`)."""
  if task == "sst2":
    path = os.path.join(directory, "sst2_pretraining_text.txt")
    lines = []
    wiki = os.path.join(data, "wikitext-2", "train.txt")
    if os.path.exists(wiki):
      with open(wiki, encoding="utf-8") as f:
        lines += [line.strip().lower() for line in f if line.strip() and not line.strip().startswith("=")]
    with open(os.path.join(data, "sst2", "train.tsv"), encoding="utf-8") as f:
      task = [row.split("\t")[0] for row in f.read().splitlines()[1:] if row.strip()]
    lines += task
    # the task's own text alone: `--pretrain-set tokenizer.include=<this file>` keeps all its words
    with open(os.path.join(directory, "sst2_train_text.txt"), "w", encoding="utf-8") as f:
      f.write("\n".join(task) + "\n")
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
  os.makedirs(os.path.join(directory, "wikitext-2"), exist_ok=True)
  with open(os.path.join(directory, "wikitext-2", "train.txt"), "w") as f:
    f.write(" = Heading = \n" + "".join(" ".join(rng.choice(filler + pos + neg) for _ in range(12)) + " \n"
                                        for _ in range(100)))
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
    "budget": ["train.steps=20", "train.eval_every=10", "train.log_every=10", "data.batch_size=8",
               "data.eval_batch_size=16"],
    "finetune": ["task.max_len=32"],  # (a language model has no task.max_len: an error there)
    "translate": ["task.max_decode_len=12", "task.beam_size=2"],
    "pretrain": ["data.seq_len=16", "train.eval_batches=2"],
}


class Clock:
  """The experiment's time limits: no run starts after `start_by` seconds, and runs still going at
  `kill_at` seconds are stopped (None: no limit); scoring the seed ensembles may go on until
  `ensemble_s` seconds after `kill_at` (an arm whose last seed was stopped there is scored then)."""

  def __init__(self, start_by: float | None, kill_at: float | None, ensemble_s: float = 0.0):
    self.t0, self.start_by, self.kill_at, self.ensemble_s = time.monotonic(), start_by, kill_at, ensemble_s

  def may_start(self) -> bool:
    return self.start_by is None or time.monotonic() - self.t0 < self.start_by

  def left(self, past_kill_at: float = 0.0) -> float | None:
    """Seconds left until `past_kill_at` seconds after `kill_at` (at least 1; None: no limit)."""
    return None if self.kill_at is None else max(1.0, self.kill_at + past_kill_at - (time.monotonic() - self.t0))

  def left_for_ensembles(self) -> float | None:
    return self.left(self.ensemble_s)


def evaluate(workdirs: str | list[str], split: str, timeout: float | None = None, soup: bool = False) -> dict:
  """`nlm-jax eval --json` of a run on `split` (several runs: as one ensemble, or with `soup` as the
  one network of their averaged parameters); SystemExit if it fails."""
  workdirs = [workdirs] if isinstance(workdirs, str) else workdirs
  code, out, err = nlm_jax_command(["eval", *(a for w in workdirs for a in ("--workdir", w)), "--split", split,
                                    "--json", *(["--soup"] if soup else [])], timeout,
                                   f"nlm-jax eval of {', '.join(workdirs)}")
  if code:
    raise SystemExit(f"nlm-jax eval failed for {', '.join(workdirs)}:\n{err[-2000:]}")
  return json.loads(out)


def curve(workdir: str, key: str) -> list[tuple[int, float]]:
  from nlm_jax.plotting import read_metrics

  return [(r["step"], r[key]) for r in read_metrics(workdir) if key in r]


def partial_curve(workdir: str, key: str) -> list[tuple[int, float]]:
  """`curve` of a run that did not finish: [] where it logged nothing."""
  from nlm_jax.errors import UserError

  try:
    return curve(workdir, key)
  except UserError:
    return []


class Job(NamedTuple):
  name: str
  run: Callable[[], dict]
  needs: tuple[str, ...] = ()


def slug(arm: str) -> str:
  return re.sub(r"[^A-Za-z0-9.]+", "_", arm).strip("_")


def tag(overrides: list[str]) -> str:
  """'' without overrides, else '_' and 8 hex digits naming them: runs of other settings get other
  directories, so a kept --runs folder never passes one setting's run off as another's."""
  return "_" + hashlib.sha256(" ".join(overrides).encode()).hexdigest()[:8] if overrides else ""


def seeds_of(seeds: int | dict[str, int], arm: str) -> int:
  """How many seeds an arm runs: `seeds`, or `seeds[arm]` (--scratch-seeds gives the scratch arm
  its own number)."""
  return seeds if isinstance(seeds, int) else seeds[arm]


def seed_range(seeds: int | dict[str, int], arm: str, first: int = 1) -> range:
  """The seeds an arm runs: `seeds_of` of them from `first` on (--first-seed: a second, disjoint
  set of seeds beside an earlier call's)."""
  return range(first, first + seeds_of(seeds, arm))


def finetune_sets(sets: list[str], backward: bool) -> list[str]:
  """The overrides every fine-tuning run adds to its recipe: `sets` (--set), and with --backward
  task.backward=true."""
  return list(sets) + (["task.backward=true"] if backward else [])


def jobs_of(task: str, arch: str, seeds: int | dict[str, int], tmp: str, data: str, quick: bool, clock: Clock,
            arms: dict[str, list[str] | None], sets: list[str] = (), pretrain_sets: list[str] = (),
            backward: bool = False, first: int = 1) -> list[Job]:
  """One pretraining run, then `seeds` fine-tuning runs per arm (`seeds_of`). `arms`: name → None (from
  scratch, needs nothing) or the overrides of a fine-tuning from the pretrained run. `sets`: the
  overrides every fine-tuning run adds to its recipe, `pretrain_sets` the pretraining's. With
  `backward` (classification), a second language model reads the text right to left
  (data.reverse=true), every fine-tuning run has a backward body (task.backward=true) and the
  pretrained arms start it from that model (train.init_backward_from). Seeds count from `first`."""
  recipe = os.path.join(CONFIGS, RECIPES[(task, arch)] + ".yaml")
  pre_recipe = os.path.join(CONFIGS, f"pretrain_{task}_{arch}.yaml")
  model = QUICK[arch] if quick else []
  budget = QUICK["budget"] if quick else []
  paths = ([f"data.files.train={data}/sst2/train.tsv", f"data.files.validation={data}/sst2/dev.tsv"]
           if task == "sst2" else
           [f"data.files.{s}={data}/multi30k/{f}" for s, f in (("train", "train"), ("validation", "val"),
                                                                ("test", "test"))])
  extra = (QUICK["finetune"] + (QUICK["translate"] if task == "multi30k" else [])) if quick else []
  sets, pretrain_sets = finetune_sets(sets, backward), list(pretrain_sets)
  pretrained = os.path.join(tmp, f"pretrain_{task}_{arch}{tag(pretrain_sets)}")
  pretrained_backward = pretrained + "_backward"
  text = unlabelled_text(task, tmp, data)

  def pretrain(workdir: str, direction: list[str]) -> dict:
    summary = train_summary(workdir, [f"data.file={text}", *model, *budget, *(QUICK["pretrain"] if quick else []),
                                      *pretrain_sets, *direction],
                            config=pre_recipe, timeout=clock.left())
    return {"wall_s": summary["wall_s"], "val_loss": summary["final_validation_loss"]}

  def finetune(arm: str, seed: int) -> dict:
    # a pretrained arm takes the pretrained run's tokenizer: its settings (--pretrain-set's too) must match
    tokenizer = [o for o in pretrain_sets if o.startswith("tokenizer.")]
    init = [] if arms[arm] is None else [f"train.init_from={pretrained}", *tokenizer, *arms[arm]]
    if backward and arms[arm] is not None:
      init.append(f"train.init_backward_from={pretrained_backward}")
    workdir = os.path.join(tmp, f"{task}_{arch}_{slug(arm)}_seed{seed}"
                                f"{tag(sets if arms[arm] is None else sets + ['|'] + pretrain_sets)}")
    # the final whole-validation-split numbers (and, translating, its BLEU)
    try:
      summary = train_summary(workdir, [*paths, *model, *budget, *extra, *init, *sets, f"seed={seed}"],
                              config=recipe, timeout=clock.left())
    except (Exception, SystemExit) as e:  # stopped at --kill-at, or failed: keep what it logged on the way
      e.partial = {"curve": partial_curve(workdir, key), "workdir": workdir}
      raise
    if task == "sst2":
      score = 100 * summary["final_validation_accuracy"]
    else:  # Multi30k: BLEU of the test split, kept beside the run (a rerun over kept runs reads it)
      stored = os.path.join(workdir, f"eval_{TASKS[task]['split']}.json")
      if not os.path.exists(stored):
        numbers = evaluate(workdir, TASKS[task]["split"], timeout=clock.left())
        with open(stored, "w") as f:
          json.dump(numbers, f)
      with open(stored) as f:
        score = json.load(f)["bleu"]
    return {"score": score, "val_loss": summary["final_validation_loss"], "wall_s": summary["wall_s"],
            "curve": curve(workdir, key), "workdir": workdir}

  key = "val_accuracy" if task == "sst2" else "val_loss"
  pre = (f"{task}/{arch}/pretrain",) + ((f"{task}/{arch}/pretrain_backward",) if backward else ())
  jobs = [Job(pre[0], functools.partial(pretrain, pretrained, []))]
  if backward:
    jobs.append(Job(pre[1], functools.partial(pretrain, pretrained_backward, ["data.reverse=true"])))
  for seed in range(first, first + max(seeds_of(seeds, arm) for arm in arms)):
    for arm, overrides in arms.items():
      if seed not in seed_range(seeds, arm, first):
        continue
      jobs.append(Job(f"{task}/{arch}/{arm}/{seed}", functools.partial(finetune, arm, seed),
                      () if overrides is None else pre))
  return jobs


class _Inline(contextlib.AbstractContextManager):
  """An executor that runs each job as it is submitted, in this thread (one at a time: what
  in-process runs need), and hands back its finished future."""

  def submit(self, fn: Callable[[], dict]) -> concurrent.futures.Future:
    future = concurrent.futures.Future()
    try:
      future.set_result(fn())
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the scheduler reports it
      future.set_exception(e)
    return future

  def __exit__(self, *exc) -> None:
    return None


def run_jobs(jobs: list[Job], n: int, clock: Clock, on_done: Callable[[dict, dict], None],
             partial: dict | None = None) -> tuple[dict, dict]:
  """Runs `jobs` (each after the jobs it needs), `n` at a time, in the order given; a failed job
  is reported and fails the jobs that need it, the others go on. Returns (results, errors); a
  failed job's `partial` attribute (what it did before it ended) goes into `partial`."""
  results, errors, pending, running = {}, {}, list(jobs), {}
  with (_Inline() if n <= 1 else concurrent.futures.ThreadPoolExecutor(n)) as pool:
    while pending or running:
      for job in list(pending):
        if len(running) >= n:
          break
        failed = [d for d in job.needs if d in errors]
        if failed or not clock.may_start():
          errors[job.name] = f"needs {failed[0]}, which failed" if failed else "not started: past --start-by"
          pending.remove(job)
        elif all(d in results for d in job.needs):
          running[pool.submit(job.run)] = job
          pending.remove(job)
      if not running:  # nothing runs, yet jobs wait: they need jobs that are not in the list
        if pending:
          raise ValueError(f"{pending[0].name} needs jobs that are not in the list: {pending[0].needs}")
        break
      done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
      for future in done:
        job = running.pop(future)
        try:
          results[job.name] = future.result()
          print(f"{job.name}: {json.dumps({k: v for k, v in results[job.name].items() if k != 'curve'})}",
                flush=True)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - one run's failure is reported, the rest go on
          errors[job.name] = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
          if partial is not None and getattr(e, "partial", None) is not None:
            partial[job.name] = e.partial
          print(f"{job.name} FAILED: {str(e)[-3000:]}", flush=True)
        on_done(results, errors)
  return results, errors


def seed_ensembles(results: dict, pairs: list[tuple[str, str]], arms_of: Callable[[str], dict],
                   seeds: int | dict[str, int], clock: Clock, errors: dict | None = None,
                   tried: set | None = None, first: int = 1, soup: bool = False) -> dict[str, float]:
  """{task/arch/arm: SST-2 dev accuracy (%) of the arm's finished seeds as one model} (`nlm-jax
  eval` with every seed's --workdir: their class probabilities averaged; `soup`: the one network
  of their averaged parameters, `nlm-jax eval --soup`), for arms with ≥ 2 seeds;
  one that fails or runs out of time is reported and left out. With `errors` (the runs that
  ended unfinished so far), only arms whose every seed has ended, so an arm's ensemble can be
  scored while other runs still train, not after --kill-at; arms named in `tried` are skipped,
  and those scored or tried here are added to it."""
  scores = {}
  for task, arch in pairs:
    for arm in arms_of(task) if task == "sst2" else ():
      keys = [f"{task}/{arch}/{arm}/{s}" for s in seed_range(seeds, arm, first)]
      name = f"{task}/{arch}/{arm}"
      mark = f"{name} (soup)" if soup else name
      if (tried is not None and mark in tried) or (errors is not None and
                                                   not all(k in results or k in errors for k in keys)):
        continue
      runs = [results[k]["workdir"] for k in keys if "workdir" in results.get(k, {})]
      if len(runs) < 2:
        continue
      if tried is not None:
        tried.add(mark)
      try:
        scores[name] = 100 * evaluate(runs, TASKS[task]["split"], clock.left_for_ensembles(), soup)["accuracy"]
      except SystemExit as e:
        print(f"{name}: no {'soup' if soup else 'ensemble'} ({str(e).strip()[-300:]})", flush=True)
  return scores


def table(results: dict, errors: dict, pairs: list[tuple[str, str]], arms_of: Callable[[str], dict],
          seeds: int | dict[str, int],
          quick: bool, sets: list[str] = (), pretrain_sets: list[str] = (),
          ensembles: dict | None = None, partial: dict | None = None, first: int = 1,
          soups: dict | None = None) -> tuple[str, dict]:
  """The markdown table of the finished runs (one row per task, model and arm; the gain and the
  spread against the first arm, from scratch; `ensembles`: the seeds as one model, per arm;
  `soups`, when given, another column: the seeds' averaged parameters as one network), and
  the per-pair rows behind it. `partial`: the validation curves of runs that did not finish (stopped
  at --kill-at), named with their last evaluation under the table and kept apart in the rows
  ("stopped"), never in the means."""
  ensembles, partial = ensembles or {}, partial or {}
  lines = ["| task | model | metric | arm | mean ± std over seeds | gain over scratch | seeds' spread (max std) "
           "| runs done | the seeds as one ensemble |" + (" the seeds as one soup |" if soups is not None else ""),
           "|---|---|---|---|---:|---:|---:|---:|---:|" + ("---:|" if soups is not None else "")]
  rows = {}
  for task, arch in pairs:
    pair = rows[f"{task}/{arch}"] = {"pretrain": results.get(f"{task}/{arch}/pretrain")}
    arms = list(arms_of(task))
    for arm in arms:
      keys = [f"{task}/{arch}/{arm}/{s}" for s in seed_range(seeds, arm, first)]
      done = [results[k] for k in keys if k in results]
      pair[arm] = {k: [r[k] for r in done] for k in ("score", "val_loss", "wall_s", "curve")}
      pair[arm]["stopped"] = [partial[k]["curve"] for k in keys if k not in results and partial.get(k, {}).get("curve")]
    base = pair[arms[0]]["score"]
    for arm in arms:
      x = pair[arm]["score"]
      gain = f"{statistics.mean(x) - statistics.mean(base):+.2f}" if x and base and arm != arms[0] else ""
      spread = max((statistics.stdev(v) for v in (x, base) if len(v) > 1), default=float("nan"))
      together = ensembles.get(f"{task}/{arch}/{arm}")
      soup = None if soups is None else soups.get(f"{task}/{arch}/{arm}")
      lines.append(f"| {task} | {arch} | {TASKS[task]['title']} | {arm} | {mean_std(x, 2)} | {gain} | "
                   f"{spread:.2f} | {len(x)} of {seeds_of(seeds, arm)} | {'' if together is None else f'{together:.2f}'} |"
                   + ("" if soups is None else f" {'' if soup is None else f'{soup:.2f}'} |"))
  for what, overrides in (("fine-tuning run", sets), ("pretraining", pretrain_sets)):
    if overrides:
      lines += ["", f"Every {what} added to its recipe: `{' '.join(overrides)}`."]
  def last_evaluation(name: str) -> str:
    c = partial.get(name, {}).get("curve")
    return f"; its last evaluation: {c[-1][1]:.4f} at step {c[-1][0]}" if c else ""

  if errors:
    lines += ["", "Not finished: " + "; ".join(f"{k} ({v}{last_evaluation(k)})" for k, v in sorted(errors.items()))]
  if quick:
    lines += ["", "QUICK MODE on toy data, not a result."]
  return "\n".join(lines), rows


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="toy data, tiny models, a few steps (what CI runs)")
  ap.add_argument("--tasks", default="sst2,multi30k")
  ap.add_argument("--archs", default="lstm,transformer")
  ap.add_argument("--pairs", default=None, help="task/arch pairs, in order (instead of --tasks × --archs): "
                                                 "e.g. multi30k/transformer,sst2/lstm")
  ap.add_argument("--arm", action="append", default=[], metavar="NAME=OVERRIDES",
                  help="another fine-tuned arm beside 'scratch' and 'pretrained': its name, '=', and the "
                       "overrides it adds to the recipe (space-separated), e.g. "
                       "'body lr x0.25=finetune.body_lr_scale=0.25' (repeatable)")
  ap.add_argument("--arm-tasks", default=None, help="the tasks the --arm arms run on (default: all)")
  ap.add_argument("--backward", action="store_true",
                  help="SST-2: pretrain a backward language model too (data.reverse=true) and fine-tune "
                       "classifiers that read the text both ways (task.backward=true), ELMo-style")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="an override every fine-tuning run (every arm, scratch too) adds to its recipe, e.g. "
                       "task.pooling=concat (repeatable; the runs get their own directories)")
  ap.add_argument("--pretrain-set", action="append", default=[], metavar="KEY=VALUE",
                  help="an override the pretraining runs add to theirs, e.g. tokenizer.vocab_size=40000 "
                       "(tokenizer.* ones reach the pretrained arms too: their tokenizer is the pretrained one)")
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--scratch-seeds", type=int, default=None,
                  help="seeds of the scratch arm (default: --seeds): fewer leave a fixed time to the "
                       "pretrained arms")
  ap.add_argument("--first-seed", type=int, default=1,
                  help="the first seed of every arm (default 1): a later call's seeds beside an earlier one's")
  ap.add_argument("--data", default=DATA, help="folder holding sst2/, multi30k/ (and wikitext-2/) as ../shared/data")
  ap.add_argument("--jobs", type=int, default=1, help="runs at a time (each an nlm-jax process; one GPU can "
                                                       "hold several of these small models)")
  ap.add_argument("--start-by", type=float, default=None, help="seconds: no run starts later")
  ap.add_argument("--kill-at", type=float, default=None, help="seconds: runs still going are stopped")
  ap.add_argument("--ensemble-s", type=float, default=30.0,
                  help="seconds after --kill-at that scoring the seed ensembles may still take (default 30)")
  ap.add_argument("--soups", action="store_true",
                  help="also score each SST-2 arm's seeds as a model soup (their parameters averaged: one network; "
                       "add --set init_seed=N so the seeds share their initial head)")
  ap.add_argument("--out", default=None, help="folder for results (default: beside this file; quick: a temp dir)")
  add_runs_argument(ap)
  args = ap.parse_args()
  tmp = scratch("pretrain_finetune-", args.runs)
  train_in_process(args.quick and args.jobs == 1)  # quick: every run in this process, one after the other
  out = args.out or (tmp if args.quick else HERE)
  data = toy_data(os.path.join(tmp, "toy")) if args.quick else os.path.abspath(args.data)
  clock = Clock(args.start_by, args.kill_at, args.ensemble_s)
  pairs = ([tuple(p.split("/", 1)) for p in args.pairs.split(",")] if args.pairs else
           [(task, arch) for task in args.tasks.split(",") for arch in args.archs.split(",")])
  for pair in pairs:
    if pair not in RECIPES:
      raise SystemExit(f"no recipe for {'/'.join(pair)}; have: {', '.join(f'{t}/{a}' for t, a in RECIPES)}")
  if args.backward and any(task != "sst2" for task, _ in pairs):
    raise SystemExit("--backward is for sst2 (classification) pairs only")
  arms: dict[str, list[str] | None] = {"scratch": None, "pretrained": []}
  for spec in args.arm:
    name, _, overrides = spec.partition("=")
    if not name.strip() or not overrides.strip() or name.strip() in arms:
      raise SystemExit(f"--arm {spec!r}: expected a new NAME=OVERRIDES, e.g. 'body lr x0.25=finetune.body_lr_scale=0.25'")
    arms[name.strip()] = overrides.split()
  arm_tasks = args.arm_tasks.split(",") if args.arm_tasks else list(TASKS)
  if args.seeds < 1 or (args.scratch_seeds or 0) < 0 or args.first_seed < 0:
    raise SystemExit("--seeds must be ≥ 1, --scratch-seeds and --first-seed ≥ 0")
  seeds = args.seeds if args.scratch_seeds is None else {**{arm: args.seeds for arm in arms},
                                                         "scratch": args.scratch_seeds}

  def arms_of(task: str) -> dict[str, list[str] | None]:
    return {name: o for i, (name, o) in enumerate(arms.items()) if i < 2 or task in arm_tasks}

  jobs = [job for task, arch in pairs
          for job in jobs_of(task, arch, seeds, tmp, data, args.quick, clock, arms_of(task), args.set,
                             args.pretrain_set, args.backward, args.first_seed)]
  needed = {name for job in jobs for name in job.needs}  # the pretrainings: first, they head the longest chains
  jobs.sort(key=lambda job: job.name not in needed)

  shown_sets = finetune_sets(args.set, args.backward)
  shown_pretrain = args.pretrain_set + (["(and a backward LM with data.reverse=true)"] if args.backward else [])

  ensembles, tried, partial = {}, set(), {}
  soups = {} if args.soups else None

  def report(results: dict, errors: dict, ensembles: dict | None = None) -> tuple[str, dict]:
    text, rows = table(results, errors, pairs, arms_of, seeds, args.quick, shown_sets, shown_pretrain,
                       ensembles, partial, args.first_seed, soups)
    write_results(out, text, {"quick": args.quick, "seeds": args.seeds, "scratch_seeds": args.scratch_seeds,
                              "first_seed": args.first_seed,
                              "set": args.set,
                              "pretrain_set": args.pretrain_set, "results": rows, "errors": errors,
                              "ensembles": ensembles or {}, "soups": soups},
                  update_readme=not args.quick)
    return text, rows

  def on_done(results: dict, errors: dict) -> None:  # an arm whose seeds have all ended: its ensemble now
    ensembles.update(seed_ensembles(results, pairs, arms_of, seeds, clock, errors, tried, args.first_seed))
    if soups is not None:
      soups.update(seed_ensembles(results, pairs, arms_of, seeds, clock, errors, tried, args.first_seed, soup=True))
    report(results, errors, ensembles)

  results, errors = run_jobs(jobs, args.jobs, clock, on_done, partial)
  ensembles.update(seed_ensembles(results, pairs, arms_of, seeds, clock, tried=tried, first=args.first_seed))
  if soups is not None:
    soups.update(seed_ensembles(results, pairs, arms_of, seeds, clock, tried=tried, first=args.first_seed, soup=True))
  text, rows = report(results, errors, ensembles)
  print(text)
  plot(rows, out)
  if errors:
    raise SystemExit(f"{len(errors)} of {len(jobs)} runs did not finish (see above)")


def plot(results: dict, out: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  for key, rows in results.items():
    task, arch = key.split("/")
    fig, ax = plt.subplots(figsize=(6, 4))
    arms = [arm for arm in rows if arm != "pretrain"]
    for arm, color in zip(arms, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")):
      for j, c in enumerate(rows[arm]["curve"]):
        ax.plot([p[0] for p in c], [p[1] for p in c], color=color, alpha=0.8, label=arm if j == 0 else None)
      for j, c in enumerate(rows[arm].get("stopped", [])):  # runs stopped before their last step: dotted
        ax.plot([p[0] for p in c], [p[1] for p in c], color=color, alpha=0.8, linestyle=":",
                label=f"{arm} (stopped)" if j == 0 else None)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("validation accuracy" if task == "sst2" else "validation loss (nats/target token)")
    ax.set_title(f"{task}, {arch}: from scratch vs pretrained arms")
    if ax.get_legend_handles_labels()[0]:
      ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{task}_{arch}_curves.png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
  main()
