"""The `nlm-jax` command (also `python -m nlm_jax`).

    nlm-jax train --config FILE [key=value ...]
    nlm-jax config show [--config FILE] [key=value ...]     every key: value, default, meaning
    nlm-jax eval --workdir DIR [--workdir DIR ...] [--split NAME] [--json]   (several classifiers: an ensemble)
    nlm-jax eval --workdir DIR --workdir DIR [...] --soup      (their parameters averaged: one network)
    nlm-jax generate --workdir DIR --prompt TEXT [--num-samples N] [--max-new-tokens N]
                     [--temperature T] [--top-k K] [--top-p P] [--seed S]
    nlm-jax predict --workdir DIR --text TEXT [--text TEXT ...] [--json]     (a classifier)
    nlm-jax translate --workdir DIR --text TEXT [--text ...] [--beam-size K] [--length-penalty A]
    nlm-jax data prepare NAME [--manual-dir DIR] [--data-dir DIR]
    nlm-jax plot --workdir DIR

A user mistake (bad config key, missing file, mismatched checkpoint, NaN loss, ...) prints one
line, `nlm-jax: error: ...`, and exits with status 2.

The commands that compile keep XLA's programs in $NLM_JAX_CACHE/xla (default
~/.cache/nlm-jax/xla; `nlm_jax.runtime.compilation_cache`): a second run of the same model loads
them. $JAX_COMPILATION_CACHE_DIR takes precedence; NLM_JAX_COMPILATION_CACHE=0 turns it off.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from nlm_jax.errors import UserError


def _train(args) -> int:
  from nlm_jax import config as config_lib
  from nlm_jax import parallel

  cfg = config_lib.load_config(args.config, args.overrides)
  from nlm_jax.training import trainer

  trainer.configure_runtime(cfg)  # device settings first: before any backend starts
  d = cfg.distributed
  parallel.maybe_initialize_distributed(d.coordinator_address, d.num_processes, d.process_id, d.cpu_collectives,
                                        d.initialize)
  from nlm_jax.training import trainer

  summary = trainer.train(cfg, started=args.started)
  if trainer.is_main_process():
    print(json.dumps(summary, indent=2))
  return 0


def _eval(args) -> int:
  from nlm_jax.training import trainer

  if args.soup:
    return _eval_soup(args)
  if len(args.workdir) > 1:
    return _eval_ensemble(args)
  run, params, step = trainer.load_run(args.workdir[0], args.step, args.best)
  split = args.split or run.cfg.data.eval_split
  changed = trainer.data_changed(run, args.workdir[0], split)
  if changed:
    from nlm_jax.training.checkpoint import warn

    warn(f"{changed}: these numbers are not on the data it was evaluated on in training")
  result = {"split": split, "step": step, **_scores(run, params, split)}
  if args.json:
    print(json.dumps(json_safe(result), allow_nan=False))
  else:
    for key, value in result.items():
      print(f"{key:>14}: {value}")
  return 0


def _scores(run, params, split: str) -> dict:
  """`run.evaluate` of the whole split (translation: and BLEU of beam-search translations)."""
  if run.cfg.task.kind == "translate":
    result = run.evaluate(params, split, None, bleu=True)
    result.pop("hypotheses")
    return result
  return run.evaluate(params, split, None)


def _members(args) -> tuple[list, list]:
  """[(workdir, run, params), ...] of every --workdir, and their checkpoints' steps."""
  from nlm_jax.training import trainer

  members, steps = [], []
  for workdir in args.workdir:
    run, params, step = trainer.load_run(workdir, args.step, args.best)
    members.append((str(workdir), run, params))
    steps.append(step)
  return members, steps


def _eval_ensemble(args) -> int:
  """Several classification runs as one model: their class probabilities averaged per example."""
  from nlm_jax.tasks import classify

  members, steps = _members(args)
  split = args.split or members[0][1].cfg.data.eval_split
  result = classify.ensemble(members, split)
  for member, step in zip(result["members"], steps):
    member["step"] = step
  result = {"split": split, **result}
  if args.json:
    print(json.dumps(json_safe(result), allow_nan=False))
  else:
    for member in result.pop("members"):
      print(f"{'member':>14}: accuracy {member['accuracy']:.6f}  loss {member['loss']:.6f}  step {member['step']}  "
            f"{member['workdir']}")
    for key, value in result.items():
      print(f"{key:>14}: {value}")
  return 0


def _eval_soup(args) -> int:
  """Several runs' parameters averaged into one network (a uniform model soup), scored as any run's
  `eval` is on the first run's split, beside each run's own score on it."""
  from nlm_jax import soup

  members, steps = _members(args)
  soup.check(members)
  run0 = members[0][1]
  split = args.split or run0.cfg.data.eval_split
  scores = [{"workdir": name, "step": step, **_scores(run0, params, split)}
            for (name, _, params), step in zip(members, steps)]
  result = {"split": split, "runs": len(members), **_scores(run0, soup.average([p for _, _, p in members]), split),
            "members": scores}
  if args.json:
    print(json.dumps(json_safe(result), allow_nan=False))
  else:
    for member in result.pop("members"):
      numbers = "  ".join(f"{k} {v:.6f}" for k, v in member.items() if isinstance(v, float))
      print(f"{'member':>14}: {numbers}  step {member['step']}  {member['workdir']}")
    for key, value in result.items():
      print(f"{key:>14}: {value}")
  return 0


# The command that uses a trained run of each task.kind.
COMMAND_FOR_TASK = {"lm": "generate", "classify": "predict", "translate": "translate"}


def _load_run_of(args, kind: str):
  """`trainer.load_run` of args.workdir, which must be a task.kind=`kind` run (else a one-line
  error naming the command for the run it is)."""
  from nlm_jax.training import trainer

  run, params, step = trainer.load_run(args.workdir, args.step, args.best)
  if run.cfg.task.kind != kind:
    raise UserError(f"{args.workdir} is a task.kind={run.cfg.task.kind} run; {args.command} needs a "
                    f"task.kind={kind} run (for this one use {COMMAND_FOR_TASK[run.cfg.task.kind]})")
  return run, params


def _generate(args) -> int:
  from nlm_jax.generate import generate_text

  run, params = _load_run_of(args, "lm")
  if run.cfg.data.reverse:
    raise UserError(f"{args.workdir} is a backward language model (data.reverse=true): it writes text right to "
                    "left, which generate does not read or print")

  def stream(piece: str):
    sys.stdout.write(piece)
    sys.stdout.flush()

  options = (args.max_new_tokens, args.seed, args.temperature, args.top_k, args.top_p)
  if args.num_samples == 1:
    generate_text(run.model, params, run.tokenizer, args.prompt, *options, stream=stream)
    sys.stdout.write("\n")
    return 0
  texts = generate_text(run.model, params, run.tokenizer, args.prompt, *options, num_samples=args.num_samples)
  for i, text in enumerate(texts):
    print(f"--- sample {i + 1} of {len(texts)} ---")
    print(text)
  return 0


def _predict(args) -> int:
  run, params = _load_run_of(args, "classify")
  probs_NxC = run.predict(params, args.text)
  for text, probs in zip(args.text, probs_NxC):
    best = int(probs.argmax())
    if args.json:
      print(json.dumps({"text": text, "label": run.labels[best], "probability": float(probs[best]),
                        "probabilities": dict(zip(run.labels, map(float, probs)))}))
    else:
      print(f"{run.labels[best]}\t{probs[best]:.4f}\t{text}")
  return 0


def _translate(args) -> int:
  run, params = _load_run_of(args, "translate")
  for line in run.translate(params, args.text, args.beam_size, args.length_penalty, args.max_len):
    print(line)
  return 0


def _config_show(args) -> int:
  import yaml

  from nlm_jax import config as config_lib

  def text(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip().removesuffix("\n...")

  rows = [(f"{key}={text(value)}", help_text + ("" if value == default else f" [default: {text(default)}]"))
          for key, value, default, help_text in config_lib.describe(args.config, args.overrides)]
  width = min(40, max(len(setting) for setting, _ in rows))
  print("# Every config key as key=value (set any with key=value after `nlm-jax train --config FILE`); "
        "??? = required.")
  for setting, help_text in rows:
    print(f"{setting:<{width}}  # {help_text}")
  return 0


def _data_prepare(args) -> int:
  from nlm_jax.data.corpus import prepare_tfds

  print(f"nlm-jax: preparing {args.name} with TFDS (from {args.manual_dir or 'a download'}); its bars follow",
        file=sys.stderr)
  path = prepare_tfds(args.name, args.manual_dir, args.data_dir)
  print(f"prepared {args.name} in {path}")
  return 0


def _plot(args) -> int:
  from nlm_jax.plotting import plot_run

  print(plot_run(args.workdir, args.output))
  return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
  """Every option's help ends with its default, unless the help text already says it."""

  def _get_help_string(self, action):
    text = action.help or ""
    if ("default" in text or action.default is None or action.default is False
        or action.default is argparse.SUPPRESS or not action.option_strings):
      return text
    return text + " (default: %(default)s)"


CONFIG_HINT = ("Every config key, its default and its meaning: nlm-jax config show [--config FILE] "
               "[key=value ...]")


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="nlm-jax", description="Neural language models in JAX/Flax.",
                              formatter_class=_HelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  add = lambda name, **kw: sub.add_parser(name, formatter_class=_HelpFormatter, **kw)

  t = add("train", help="train (or resume) a run from a YAML config",
          description="Train (or resume) the run in `workdir`, configured by a YAML recipe and key=value overrides.",
          epilog=CONFIG_HINT)
  t.add_argument("--config", help="YAML recipe, e.g. experiments/configs/shakespeare_char_transformer.yaml "
                                  "(default: none, every key at its default)")
  t.add_argument("overrides", nargs="*", metavar="key=value",
                 help="dotted overrides, e.g. workdir=runs/x train.steps=100 (see `nlm-jax config show`)")
  t.set_defaults(fn=_train)

  c = add("config", help="show every config key with its value, default and meaning")
  csub = c.add_subparsers(dest="config_command", required=True)
  show = csub.add_parser("show", formatter_class=_HelpFormatter,
                         help="print every key: its value (the default, or the recipe's and the overrides'), "
                              "its default and what it means",
                         description="Print every config key as key=value with its meaning; keys a recipe or an "
                                     "override changed also show their default.")
  show.add_argument("--config", help="YAML recipe whose values to show (default: none, the defaults)")
  show.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, as for train")
  show.set_defaults(fn=_config_show)

  for name, fn, help_text in (("eval", _eval, "loss and perplexity (a classifier: accuracy) of a trained run on "
                                             "a whole split"),
                              ("generate", _generate, "sample text from a trained run"),
                              ("predict", _predict, "the class and its probability of each text, from a "
                                                    "trained classifier"),
                              ("translate", _translate, "translations of source sentences by a trained "
                                                        "translation run (beam search)")):
    e = add(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
    if name == "eval":
      e.add_argument("--workdir", required=True, action="append",
                     help="the run directory; repeated, classification runs scored as one ensemble (their "
                          "class probabilities averaged per example)")
    else:
      e.add_argument("--workdir", required=True, help="the run directory")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    e.add_argument("--best", action="store_true",
                   help="the checkpoint with the best val_loss (default: the latest)")
    e.set_defaults(fn=fn)
    if name == "eval":
      e.add_argument("--split", default=None, help="split name (default: the run's data.eval_split)")
      e.add_argument("--json", action="store_true", help="print one JSON object (default: one line per number)")
      e.add_argument("--soup", action="store_true",
                     help="with several --workdir: score the one network their averaged parameters make (a "
                          "uniform model soup; runs of one architecture, tokenizer and task; default: an ensemble of "
                          "several classifiers)")
    elif name == "translate":
      e.add_argument("--text", action="append", required=True,
                     help="a source sentence (repeat for several; one translation per line)")
      e.add_argument("--beam-size", type=int, default=None, help="beams (1: greedy) (default: the run's task.beam_size)")
      e.add_argument("--length-penalty", type=float, default=None,
                     help="α of ((5 + n)/6)^α (default: the run's task.length_penalty)")
      e.add_argument("--max-len", type=int, default=None,
                     help="most tokens per translation (default: the run's task.max_decode_len)")
    elif name == "predict":
      e.add_argument("--text", action="append", required=True,
                     help="a text to classify (repeat for several; one line each: label, probability, text)")
      e.add_argument("--json", action="store_true",
                     help="one JSON object per text, with every class's probability (default: a line of text each)")
    else:
      e.add_argument("--prompt", default="",
                     help="text to continue, encoded by the run's tokenizer (default: '', the tokenizer's "
                          "start id)")
      e.add_argument("--num-samples", type=int, default=1, help="continuations sampled in one batched call")
      e.add_argument("--max-new-tokens", type=int, default=200, help="tokens sampled per continuation")
      e.add_argument("--temperature", type=float, default=1.0,
                     help="τ: logits are divided by it; 0 = greedy (default: 1.0)")
      e.add_argument("--top-k", type=int, default=None,
                     help="sample among the k most likely tokens (default: all)")
      e.add_argument("--top-p", type=float, default=None,
                     help="nucleus: the fewest tokens holding probability p (default: 1, all)")
      e.add_argument("--seed", type=int, default=0, help="PRNG seed of the sampling")

  d = add("data", help="dataset preparation")
  dsub = d.add_subparsers(dest="data_command", required=True)
  prep = dsub.add_parser("prepare", help="prepare a TFDS dataset as ArrayRecord", formatter_class=_HelpFormatter)
  prep.add_argument("name", help="TFDS dataset name, e.g. tiny_shakespeare")
  prep.add_argument("--manual-dir", default=None,
                    help="folder holding the files TFDS would download (default: download them)")
  prep.add_argument("--data-dir", default=None, help="TFDS data_dir (default: ~/tensorflow_datasets)")
  prep.set_defaults(fn=_data_prepare)

  pl = add("plot", help="PNG of the loss and perplexity curves against steps and tokens")
  pl.add_argument("--workdir", required=True, help="the run directory")
  pl.add_argument("--output", default=None, help="PNG path (default: WORKDIR/curves.png)")
  pl.set_defaults(fn=_plot)
  return p


def check_options(args) -> None:
  """The numeric options of eval / generate, checked before anything is loaded."""
  import math

  def bad(option: str, value, what: str) -> UserError:
    return UserError(f"{option} {value}: must be {what}")

  if getattr(args, "step", None) is not None and args.step < 0:
    raise bad("--step", args.step, "≥ 0")
  if getattr(args, "step", None) is not None and getattr(args, "best", False):
    raise UserError(f"--step {args.step} and --best name two checkpoints: give one")
  if getattr(args, "max_new_tokens", 0) < 0:
    raise bad("--max-new-tokens", args.max_new_tokens, "≥ 0")
  for option in ("beam_size", "max_len"):
    if getattr(args, option, None) is not None and getattr(args, option) < 1:
      raise bad("--" + option.replace("_", "-"), getattr(args, option), "≥ 1")
  if getattr(args, "length_penalty", None) is not None and not (math.isfinite(args.length_penalty)
                                                                 and args.length_penalty >= 0):
    raise bad("--length-penalty", args.length_penalty, "a finite number ≥ 0")
  if getattr(args, "num_samples", 1) < 1:
    raise bad("--num-samples", args.num_samples, "≥ 1")
  if not 0 <= getattr(args, "seed", 0) < 2**32:  # a PRNG key holds the low 32 bits: 2^32 would repeat 0
    raise bad("--seed", args.seed, "in [0, 2^32) (a larger one repeats a smaller one's samples)")
  temperature = getattr(args, "temperature", 1.0)
  if not (math.isfinite(temperature) and temperature >= 0):
    raise bad("--temperature", temperature, "a finite number > 0 (or 0: greedy)")
  if getattr(args, "top_k", None) is not None and args.top_k < 1:
    raise bad("--top-k", args.top_k, "≥ 1 (or left out: all tokens)")
  top_p = getattr(args, "top_p", None)
  if top_p is not None and not (0 < top_p <= 1):
    raise bad("--top-p", top_p, "in (0, 1]")
  texts = [("--prompt", getattr(args, "prompt", None))] + [("--text", t) for t in getattr(args, "text", None) or []]
  for option, text in texts:
    try:  # argv's undecodable bytes arrive as lone surrogates, which no tokenizer can encode
      (text or "").encode("utf-8")
    except UnicodeEncodeError:
      raise UserError(f"{option} {ascii(text)}: not valid UTF-8 text") from None


def json_safe(record: dict) -> dict:
  """NaN and Inf become null: JSON has no such numbers."""
  import math

  return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def _quiet_libraries() -> None:
  """Library chatter (absl INFO/WARNING from Orbax and TFDS) would bury the progress bar."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
  except ImportError:
    pass


def _process_start() -> float:
  """When this process started, as a time.time() (Linux: from /proc, so the imports before
  main() count); elsewhere, now."""
  try:
    with open("/proc/self/stat") as f:
      start_ticks = float(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - age if 0 <= age < 86400 * 365 else time.time()
  except (OSError, ValueError, IndexError, AttributeError):
    return time.time()


def main(argv: list[str] | None = None) -> int:
  args = parser().parse_args(argv)
  # train's wall_time_s counts from here: the process's start, or now when called in a running
  # program (argv given: a test, an experiment's quick mode)
  args.started = _process_start() if argv is None else time.time()
  _quiet_libraries()
  try:
    if args.fn in (_train, _eval, _generate, _predict, _translate):  # the commands that compile
      from nlm_jax import runtime
      from nlm_jax.data.corpus import default_cache_dir

      runtime.compilation_cache(os.path.join(default_cache_dir(), "xla"))
    check_options(args)
    return args.fn(args)
  except UserError as e:
    print(f"nlm-jax: error: {e}", file=sys.stderr)
    return 2
  except OSError as e:  # the environment (disk full, permissions, a file gone): one line, no traceback
    where = f" ({e.filename})" if e.filename else ""
    print(f"nlm-jax: error: {e.strerror or e}{where}; check the path, its permissions and the free disk space, "
          "then rerun (earlier checkpoints are kept)", file=sys.stderr)
    return 2
  except MemoryError:  # numpy's allocation (e.g. --num-samples far too large): no traceback
    print("nlm-jax: error: out of host memory; ask for less (--num-samples, data.batch_size, ...)", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("nlm-jax: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
