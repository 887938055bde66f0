"""The `nlm-jax` command (also `python -m nlm_jax`).

    nlm-jax train --config FILE [key=value ...]
    nlm-jax eval --workdir DIR [--split NAME] [--json]
    nlm-jax generate --workdir DIR --prompt TEXT [--max-new-tokens N] [--temperature T]
                     [--top-k K] [--top-p P] [--seed S]
    nlm-jax data prepare NAME [--manual-dir DIR] [--data-dir DIR]
    nlm-jax plot --workdir DIR

A user mistake (bad config key, missing file, mismatched checkpoint, NaN loss, ...) prints one
line, `nlm-jax: error: ...`, and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from nlm_jax.errors import UserError


def _train(args) -> int:
  from nlm_jax import config as config_lib
  from nlm_jax import parallel

  cfg = config_lib.load_config(args.config, args.overrides)
  d = cfg.distributed
  parallel.maybe_initialize_distributed(d.coordinator_address, d.num_processes, d.process_id, d.cpu_collectives,
                                        d.initialize)
  from nlm_jax.training import trainer

  summary = trainer.train(cfg)
  if trainer.is_main_process():
    print(json.dumps(summary, indent=2))
  return 0


def _eval(args) -> int:
  from nlm_jax.training import trainer

  run, params, step = trainer.load_run(args.workdir, args.step, args.best)
  split = args.split or run.cfg.data.eval_split
  result = run.evaluate(params, split, None)
  result = {"split": split, "step": step, **result}
  if args.json:
    print(json.dumps(result))
  else:
    for key, value in result.items():
      print(f"{key:>14}: {value}")
  return 0


def _generate(args) -> int:
  from nlm_jax.generate import generate_text
  from nlm_jax.training import trainer

  run, params, _ = trainer.load_run(args.workdir, args.step, args.best)

  def stream(piece: str):
    sys.stdout.write(piece)
    sys.stdout.flush()

  sys.stdout.write(args.prompt)
  generate_text(run.model, params, run.tokenizer, args.prompt, args.max_new_tokens, args.seed,
                args.temperature, args.top_k, args.top_p, stream=stream)
  sys.stdout.write("\n")
  return 0


def _data_prepare(args) -> int:
  from nlm_jax.data.corpus import prepare_tfds

  path = prepare_tfds(args.name, args.manual_dir, args.data_dir)
  print(f"prepared {args.name} in {path}")
  return 0


def _plot(args) -> int:
  from nlm_jax.plotting import plot_run

  print(plot_run(args.workdir, args.output))
  return 0


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="nlm-jax", description="Neural language models in JAX/Flax.")
  sub = p.add_subparsers(dest="command", required=True)

  t = sub.add_parser("train", help="train (or resume) a run from a YAML config")
  t.add_argument("--config", help="YAML recipe, e.g. experiments/configs/shakespeare_char_transformer.yaml")
  t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. workdir=runs/x train.steps=100")
  t.set_defaults(fn=_train)

  for name, fn, help_text in (("eval", _eval, "loss and perplexity of a trained run on a split"),
                              ("generate", _generate, "sample text from a trained run")):
    e = sub.add_parser(name, help=help_text)
    e.add_argument("--workdir", required=True)
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    e.add_argument("--best", action="store_true", help="the checkpoint with the best validation loss")
    e.set_defaults(fn=fn)
    if name == "eval":
      e.add_argument("--split", default=None, help="split name (default: the run's eval split)")
      e.add_argument("--json", action="store_true", help="print one JSON object")
    else:
      e.add_argument("--prompt", default="", help="text to continue ('' starts from the tokenizer's start id)")
      e.add_argument("--max-new-tokens", type=int, default=200)
      e.add_argument("--temperature", type=float, default=1.0)
      e.add_argument("--top-k", type=int, default=None)
      e.add_argument("--top-p", type=float, default=None)
      e.add_argument("--seed", type=int, default=0)

  d = sub.add_parser("data", help="dataset preparation")
  dsub = d.add_subparsers(dest="data_command", required=True)
  prep = dsub.add_parser("prepare", help="prepare a TFDS dataset as ArrayRecord")
  prep.add_argument("name")
  prep.add_argument("--manual-dir", default=None, help="folder holding the files TFDS would download")
  prep.add_argument("--data-dir", default=None, help="TFDS data_dir (default: ~/tensorflow_datasets)")
  prep.set_defaults(fn=_data_prepare)

  pl = sub.add_parser("plot", help="PNG of loss and perplexity against steps and tokens")
  pl.add_argument("--workdir", required=True)
  pl.add_argument("--output", default=None, help="PNG path (default: WORKDIR/curves.png)")
  pl.set_defaults(fn=_plot)
  return p


def _quiet_libraries() -> None:
  """Library chatter (absl INFO/WARNING from Orbax and TFDS) would bury the progress bar."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
  except ImportError:
    pass


def main(argv: list[str] | None = None) -> int:
  args = parser().parse_args(argv)
  _quiet_libraries()
  if getattr(args, "max_new_tokens", 1) < 0 or (getattr(args, "temperature", 0.0) or 0.0) < 0:
    print("nlm-jax: error: --max-new-tokens and --temperature must be non-negative", file=sys.stderr)
    return 2
  try:
    return args.fn(args)
  except UserError as e:
    print(f"nlm-jax: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("nlm-jax: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
