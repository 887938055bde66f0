"""The GPU recipe runs as configured (at toy size, on any backend), and the benchmark's batches
are what they claim: real text, uniform ids, or one text row repeated."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from support import run_cli, write_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_RECIPE = os.path.join(ROOT, "experiments", "configs", "shakespeare_char_gpu.yaml")


def test_gpu_recipe_is_nanogpts_and_trains_at_toy_size(tmp_path):
  """The recipe's own settings (bf16 policy, attention dropout at p, nanoGPT's estimator) run end
  to end with only the sizes shrunk; both estimates (validation and eval-mode training loss) are
  logged at every evaluation."""
  from nlm_jax import config as config_lib

  cfg = config_lib.load_config(GPU_RECIPE, ["workdir=x"])
  m = cfg.model
  assert (m["d_model"], m["n_heads"], m["n_layers"], m["context"], m["dropout"], m["dtype"]) == (
      384, 6, 6, 256, 0.2, "bfloat16")
  assert m.get("attn_dropout") is None  # nanoGPT drops attention probabilities at p too
  assert (cfg.data.batch_size, cfg.data.seq_len, cfg.data.split_fractions) == (64, 256, [0.9, 0.1])
  assert (cfg.train.steps, cfg.train.eval_every, cfg.train.eval_batches, cfg.train.eval_estimator) == (
      5000, 250, 200, "random_windows")
  assert cfg.train.deterministic
  corpus = write_corpus(tmp_path / "corpus.txt", n_lines=200)
  code, out, err = run_cli("train", "--config", GPU_RECIPE, f"workdir={tmp_path / 'run'}", f"data.file={corpus}",
                           "model.d_model=16", "model.n_heads=2", "model.n_layers=1", "model.context=16",
                           "data.batch_size=4", "data.seq_len=16", "train.steps=4", "train.eval_every=2",
                           "train.eval_batches=2", "train.log_every=2", "train.checkpoint_every=2",
                           "train.progress=false")
  assert code == 0, err
  summary = json.loads(out[out.index("{"):])
  assert np.isfinite(summary["final_validation_loss"])
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    evals = [r for r in map(json.loads, f) if "val_loss" in r]
  assert [r["step"] for r in evals] == [2, 4]
  assert all(np.isfinite(r["val_loss"]) and np.isfinite(r["eval_train_loss"]) for r in evals)


def test_benchmark_batches_are_real_text_uniform_ids_or_one_repeated_row(monkeypatch):
  from benchmarks import run

  text_ids = np.arange(1000) % 65
  monkeypatch.setattr(run, "corpus_ids", lambda corpus: text_ids)
  case = run.CASES[0]
  text = run.token_batches(case, "text", seed=1)
  assert text.shape == (8, case.batch, case.seq + 1)
  starts = text[..., 0]
  np.testing.assert_array_equal(text, text_ids[starts[..., None] + np.arange(case.seq + 1)])  # windows
  assert len(np.unique(starts)) > 1
  repeated = run.token_batches(case, "repeated", seed=1)
  assert (repeated == repeated[:, :1]).all() and not (repeated == repeated[:1]).all()
  uniform = run.token_batches(case, "uniform", seed=1)
  assert uniform.max() < case.cfg.vocab_size and len(np.unique(uniform)) > 60
  with pytest.raises(ValueError):
    run.token_batches(case, "zeros")


def test_gpu_table_names_the_card_and_every_row():
  from benchmarks import run

  step = {"deterministic": True, "text_ms": 9.0, "uniform_ms": 8.9, "repeated_ms": 9.1, "text_vs_uniform": 1.01,
          "mfu_text": 0.3}
  results = {"date": "2026-11-25", "machine": {"gpu": "NVIDIA H100 80GB HBM3", "cpu": "x", "jax": "0.11.2",
                                                "torch": "2.11"},
             "bf16_peak_gflops": 700e3, "torch_bf16_peak_gflops": 750e3,
             "steps": [step, {**step, "model": {"embed_method": "gather"}}, {**step, "deterministic": False}],
             "torch_step": {"ms": 16.3, "mfu": 0.2},
             "recipe": {"repeats": 1, "wall_ratio": 0.45,
                        "sides": {s: {"wall_s": w, "ms_per_iter": 9.0, "best_val_loss": 1.47, "final_val_loss": 1.6,
                                      "mfu": 0.3} for s, w in (("nlm-jax", 85.0), ("pytorch", 190.5))}}}
  table = run.gpu_markdown(results)
  assert "NVIDIA H100 80GB HBM3" in table and "750 TFLOP/s" in table
  assert "| 85.0 s | 190.5 s |" in table and "0.45×" in table
  assert "embed_method=gather" in table and "non-deterministic ops" in table and "| 16.30 |" in table


def test_collectives_are_counted_from_compiled_hlo():
  """benchmarks/collectives.py's count: each collective once (an async pair by its done), its
  bytes from every result shape and dtype (a combined all-reduce returns a tuple), nothing else."""
  from benchmarks.collectives import collectives

  hlo = """
  %all-reduce.1 = (f32[4,8]{1,0}, bf16[16]{0}) all-reduce(f32[4,8]{1,0} %a, bf16[16]{0} %b), to_apply=%add
  %all-gather-start = (f32[2,3]{1,0}, f32[8,3]{1,0}) all-gather-start(f32[2,3]{1,0} %c), dimensions={0}
  %all-gather-done = f32[8,3]{1,0} all-gather-done((f32[2,3]{1,0}, f32[8,3]{1,0}) %all-gather-start)
  %reduce-scatter = f32[5]{0} reduce-scatter(f32[20]{0} %d), dimensions={0}, to_apply=%add
  %add.2 = f32[5]{0} add(f32[5]{0} %e, f32[5]{0} %f)
  %fusion = f32[7]{0} fusion(f32[7]{0} %all-reduce.1), kind=kLoop, calls=%fused
  """
  assert collectives(hlo) == {"all-reduce": (1, 4 * 8 * 4 + 16 * 2), "all-gather": (1, 24 * 4),
                              "reduce-scatter": (1, 5 * 4)}
