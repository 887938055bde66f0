"""Tasks beyond language modelling, trained by the one trainer (`nlm_jax.training.trainer`).

A task's run object gives the trainer its batches, steps and evaluation; the trainer keeps the
checkpointing, resume, logging, sharding and NaN guard for all of them.

    task.kind   run
    lm          nlm_jax.training.trainer.Run
    classify    nlm_jax.tasks.classify.ClassifyRun
    translate   nlm_jax.tasks.translate.TranslateRun
"""

from __future__ import annotations


def make_run(cfg, tokenizer=None, mesh=None, workdir=None):
  if cfg.task.kind == "classify":
    from nlm_jax.tasks.classify import ClassifyRun

    return ClassifyRun(cfg, tokenizer, mesh, workdir)
  if cfg.task.kind == "translate":
    from nlm_jax.tasks.translate import TranslateRun

    return TranslateRun(cfg, tokenizer, mesh, workdir)
  raise ValueError(f"no run for task.kind={cfg.task.kind!r}")
