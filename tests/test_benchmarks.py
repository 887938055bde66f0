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


def test_collectives_count_every_dtype_by_its_width():
  """A result's bytes from its type's bit width: fp8 (f8e4m3fn) 1 byte, c64 8 (it was 0 and 4:
  the dtype was not matched, or not in a table), sub-byte s4 packed, pred a byte, a token none."""
  from benchmarks.collectives import collectives, element_bits

  assert [element_bits(t) for t in ("pred", "s4", "f8e4m3fn", "bf16", "f32", "c64", "c128", "token")] == [
      8, 4, 8, 16, 32, 64, 128, 0]
  hlo = """
  %a = f8e4m3fn[16]{0} all-gather(f8e4m3fn[2]{0} %y), dimensions={0}
  %b = c64[16]{0} all-reduce(c64[16]{0} %z), to_apply=%add
  %c = (s4[16]{0}, pred[3]{0}, token[]) all-to-all(s4[16]{0} %w, pred[3]{0} %p, token[] %t)
  %d = bf16[] collective-permute(bf16[] %v), source_target_pairs={{0,1}}
  """
  assert collectives(hlo) == {"all-gather": (1, 16), "all-reduce": (1, 128), "all-to-all": (1, 8 + 3),
                              "collective-permute": (1, 2)}


def test_model_flops_count_only_the_parameters_in_matrix_products():
  """6N + 12·L·d·T for a Transformer, 6N otherwise, N without a learned position table (rotary has
  none) nor an input table that is only looked up: untied, or the FNN's."""
  import dataclasses

  from benchmarks.run import model_flops_per_token
  from nlm_jax import models

  t = models.TransformerConfig(vocab_size=65, d_model=8, n_heads=2, n_layers=3, context=16)  # learned, tied
  attention = 12.0 * 3 * 8 * 20
  assert model_flops_per_token(t, 10_000, 20) == 6.0 * (10_000 - 16 * 8) + attention
  assert model_flops_per_token(dataclasses.replace(t, tie_embeddings=False), 10_000, 20) == (
      6.0 * (10_000 - 16 * 8 - 65 * 8) + attention)
  assert model_flops_per_token(dataclasses.replace(t, pos_encoding="rotary"), 10_000, 20) == 6.0 * 10_000 + attention
  lstm = models.LSTMConfig(vocab_size=100, d_embed=7, d_hidden=7)
  assert model_flops_per_token(lstm, 5_000, 35) == 6.0 * (5_000 - 700)
  assert model_flops_per_token(dataclasses.replace(lstm, tie_embeddings=True), 5_000, 35) == 6.0 * 5_000
  fnn = models.FNNConfig(vocab_size=100, context=5, d_embed=7, d_hidden=9)
  assert model_flops_per_token(fnn, 5_000, 35) == 6.0 * (5_000 - 700)


class FakeWorker:
  """A benchmark worker whose runs take the seconds given: `runs[data]` (per step, one per timed
  repeat; warm-up runs take 1 s), and whose matmul peaks are `peaks`, in turn."""

  def __init__(self, runs=None, peaks=(), params=0):
    self.runs, self.peaks, self.params, self.data, self.calls = runs or {}, list(peaks), params, "text", []

  def __call__(self, fn, *args):
    self.calls.append((fn, *args))
    if fn in ("jax_setup", "torch_setup"):
      return self.params
    if fn == "jax_data":
      self.data = args[0]
    if fn in ("jax_run", "torch_run"):
      n = args[0]
      return 1.0 if n == 3 else n * self.runs[self.data].pop(0)
    if fn == "matmul_peak":
      return self.peaks.pop(0)
    return None


def test_data_dependence_reports_median_ms_per_step_and_their_ratios():
  """ms per step: the median over repeats of each repeat's time over its steps; text / uniform and
  repeated / uniform are ratios of those medians."""
  from benchmarks import run

  w = FakeWorker({"text": [1e-3, 2e-3, 6e-3], "uniform": [4e-3, 4e-3, 1e-3], "repeated": [8e-3, 9e-3, 10e-3]})
  r = run.data_dependence(0, 3, w, steps=5, model_overrides={"embed_method": "gather"})
  assert w.calls[0] == ("jax_setup", 0, 0, "text", {"embed_method": "gather"})
  assert (r["text_ms"], r["uniform_ms"], r["repeated_ms"]) == pytest.approx((2.0, 4.0, 9.0))
  assert r["text_vs_uniform"] == pytest.approx(0.5) and r["repeated_vs_uniform"] == pytest.approx(2.25)
  assert r["model"] == {"embed_method": "gather"} and (r["repeats"], r["steps_per_repeat"]) == (3, 5)


def test_training_throughput_speedup_ms_and_mfu_from_medians():
  """tokens/s = B·T·steps / median seconds per repeat (each side); speed-up = nlm-jax / PyTorch;
  MFU against the median of the given peak and the peaks re-measured at every repeat."""
  from benchmarks import run

  case = run.CASES[0]  # B=12, T=64, 20 steps per repeat
  n = 800_000
  jaxw = FakeWorker({"text": [s / case.steps for s in (2.0, 1.0, 4.0)]}, peaks=(50.0, 200.0, 300.0), params=n)
  torchw = FakeWorker({"text": [s / case.steps for s in (4.0, 4.0, 3.0)]}, params=n)
  r = run.training_throughput(0, 3, 100.0, jaxw, torchw)
  jax_tps, torch_tps = 12 * 64 * 20 / 2.0, 12 * 64 * 20 / 4.0
  assert r["jax_tokens_per_s"] == pytest.approx(jax_tps) and r["torch_tokens_per_s"] == pytest.approx(torch_tps)
  assert r["speedup"] == pytest.approx(2.0)
  assert r["jax_ms_per_step"] == pytest.approx(100.0) and r["torch_ms_per_step"] == pytest.approx(200.0)
  flops = 6.0 * (n - 64 * 128) + 12.0 * 4 * 128 * 64
  assert r["flops_per_token"] == pytest.approx(flops) and r["matmul_peak_gflops"] == pytest.approx(150.0)
  assert r["jax_mfu"] == pytest.approx(flops * jax_tps / 150e9)
  assert r["torch_mfu"] == pytest.approx(flops * torch_tps / 150e9)


def test_matmul_peak_is_two_n_cubed_over_the_median_time(monkeypatch):
  import types

  from benchmarks import run

  clock = iter([0.0, 1.0, 10.0, 12.0, 20.0, 26.0])  # repeats of 1, 2 and 6 s
  monkeypatch.setattr(run, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
  assert run.matmul_peak(None, n=4, repeats=3) == pytest.approx(2 * 4 ** 3 / 2.0 / 1e9)


def fake_processes(monkeypatch, run, jax_runs, torch_runs, evals=()):
  """`subprocess.run` in benchmarks.run: an `nlm-jax train` takes jax_runs[i]["wall"] seconds of
  the module's clock and prints a summary (and writes `evals` to its metrics.jsonl), the PyTorch
  script takes torch_runs[i]["wall"] and prints its result line."""
  import types

  clock = [0.0]
  jax_runs, torch_runs = list(jax_runs), list(torch_runs)

  def fake_run(argv, **kwargs):
    if "prepare" in argv:
      return types.SimpleNamespace(returncode=0, stdout="", stderr="")
    if argv[1:3] == ["-m", "nlm_jax"]:
      r = jax_runs.pop(0)
      workdir = next(a for a in argv if a.startswith("workdir="))[len("workdir="):]
      os.makedirs(workdir, exist_ok=True)
      with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(e) + "\n" for e in [{"step": 1, "train_loss": 3.0}, *evals]))
    else:
      r = torch_runs.pop(0)
    clock[0] += r["wall"]
    return types.SimpleNamespace(returncode=0, stdout="log line\n" + json.dumps(r["out"]) + "\n", stderr="")

  monkeypatch.setattr(run, "subprocess", types.SimpleNamespace(run=fake_run))
  monkeypatch.setattr(run, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))


def test_recipe_wall_time_medians_and_speedups(tmp_path, monkeypatch):
  """Each time is the median over repeats; speed-ups are PyTorch's time over nlm-jax's, process
  start to exit and training loop apart."""
  from benchmarks import run

  (tmp_path / "input.txt").write_text("text\n")
  monkeypatch.setattr(run, "SHAKESPEARE", str(tmp_path))
  jax_runs = [{"wall": w, "out": {"loop_time_s": l, "final_validation_loss": v}}
              for w, l, v in ((10.0, 8.0, 1.5), (30.0, 7.0, 1.6), (20.0, 9.0, 1.4))]
  torch_runs = [{"wall": w, "out": {"wall_s": l, "val_loss": 1.45}} for w, l in ((50.0, 45.0), (40.0, 35.0), (60.0, 30.0))]
  fake_processes(monkeypatch, run, jax_runs, torch_runs)
  r = run.recipe_wall_time(repeats=3)
  assert (r["jax_wall_s"], r["jax_loop_s"], r["torch_wall_s"], r["torch_loop_s"]) == pytest.approx((20.0, 8.0, 50.0, 35.0))
  assert r["speedup"] == pytest.approx(2.5) and r["loop_speedup"] == pytest.approx(35.0 / 8.0)
  assert (r["jax_val_loss"], r["torch_val_loss"], r["repeats"]) == (1.4, 1.45, 3)


def test_gpu_recipe_rows_best_and_final_losses_ms_mfu_and_wall_ratio(monkeypatch):
  """Per side: the median over repeats of wall, loop and losses (nlm-jax's best: the lowest
  logged validation loss, its final: the last); ms per iteration over the loop; MFU from the loop's
  tokens/s; the wall ratio is nlm-jax's over PyTorch's."""
  from benchmarks import run

  n = 10_000_000
  jax_runs = [{"wall": w, "out": {"loop_time_s": l, "params": n, "steps": 5000}}
              for w, l in ((100.0, 70.0), (80.0, 60.0), (90.0, 65.0))]
  torch_runs = [{"wall": w, "out": {"wall_s": l, "train_s": 1.0, "val_loss": v, "best_val_loss": b, "train_loss": 1.2,
                                    "params": n, "iters": 5000}}
                for w, l, v, b in ((200.0, 150.0, 1.50, 1.47), (180.0, 170.0, 1.60, 1.46), (190.0, 160.0, 1.55, 1.48))]
  evals = [{"step": 250, "val_loss": 2.0}, {"step": 500, "val_loss": 1.4}, {"step": 750, "val_loss": 1.5,
                                                                          "eval_train_loss": 1.3}]
  fake_processes(monkeypatch, run, jax_runs, torch_runs, evals)
  r = run.gpu_recipe(3, 1000.0)
  j, t = r["sides"]["nlm-jax"], r["sides"]["pytorch"]
  assert (j["wall_s"], j["loop_s"], j["best_val_loss"], j["final_val_loss"]) == pytest.approx((90.0, 65.0, 1.4, 1.5))
  assert (t["wall_s"], t["loop_s"], t["best_val_loss"], t["final_val_loss"]) == pytest.approx((190.0, 160.0, 1.47, 1.55))
  assert j["ms_per_iter"] == pytest.approx(13.0) and t["ms_per_iter"] == pytest.approx(32.0)
  flops = 6.0 * (n - 256 * 384) + 12.0 * 6 * 384 * 256
  assert j["mfu"] == pytest.approx(flops * 64 * 256 * 5000 / 65.0 / 1e12)
  assert t["mfu"] == pytest.approx(flops * 64 * 256 * 5000 / 160.0 / 1e12)
  assert r["wall_ratio"] == pytest.approx(90.0 / 190.0) and r["runs"]["nlm-jax"][0]["final_train_loss"] == 1.3


def test_cpu_table_rows_speedups_and_ratios():
  """Each section's row: MFU columns in order, the recipe's speed-ups (whole run, then loop), scan
  and unrolled compile times by depth ascending, and the pipeline against the matching training
  step's tokens/s."""
  from benchmarks import run

  results = {
      "date": "2026-11-25", "machine": {"cpu": "x", "cores": 2, "backend": "cpu", "jax": "0.1", "torch": "2.0"},
      "matmul_peak_gflops": 100.0,
      "training": [{"case": "transformer nanoGPT (4×128)", "params": 800_000, "jax_tokens_per_s": 10_000.0,
                    "torch_tokens_per_s": 5_000.0, "speedup": 2.0, "jax_mfu": 0.25, "torch_mfu": 0.1},
                   {"case": "LSTM word_language_model", "params": 13_000_000, "jax_tokens_per_s": 2_000.0,
                    "torch_tokens_per_s": 4_000.0, "speedup": 0.5, "jax_mfu": 0.05, "torch_mfu": 0.12}],
      "recipe": {"repeats": 3, "jax_wall_s": 20.0, "jax_loop_s": 8.0, "jax_val_loss": 1.4, "torch_wall_s": 50.0,
                 "torch_loop_s": 35.0, "torch_val_loss": 1.45, "speedup": 2.5, "loop_speedup": 4.375},
      "generation": [{"model": "transformer", "jax_cached_ms": 1.0, "jax_recompute_ms": 3.0, "cache_speedup": 3.0,
                      "torch_cached_ms": 2.0, "torch_recompute_ms": 4.0},
                     {"model": "LSTM", "jax_cached_ms": 1.0, "jax_recompute_ms": 1.5, "cache_speedup": 1.5,
                      "torch_cached_ms": 2.0, "torch_recompute_ms": None}],
      "compile": [{"layers": L, "scan": s, "seconds": L * (1.0 if s else 2.0)} for s in (False, True) for L in (6, 2)],
      "pipeline": [{"pipeline": "windows", "tokens_per_s": 1_000_000.0},
                   {"pipeline": "streams", "tokens_per_s": 500_000.0}]}
  table = run.markdown(results)
  assert "| transformer nanoGPT (4×128) | 800,000 | 10,000 | 5,000 | 2.00× | 25% | 10% |" in table
  assert "| LSTM word_language_model | 13,000,000 | 2,000 | 4,000 | 0.50× | 5% | 12% |" in table
  assert "| speed-up | 2.50× | 4.38× | |" in table
  assert "| LSTM | 1.00 | 1.50 | 1.5× | 2.00 | — |" in table
  assert "| time to first step (s) | L=2 | L=6 |" in table
  assert "| unrolled layers | 4.0 | 12.0 |" in table and "| nn.scan over layers | 2.0 | 6.0 |" in table
  assert "| windows | 1,000,000 | 100× |" in table and "| streams | 500,000 | 250× |" in table


def test_collectives_table_rows_and_ratio():
  """A row per model and mesh: counts and MB (10⁶ bytes) constrained / XLA alone, and XLA's bytes
  over the constrained ones."""
  from benchmarks.collectives import collectives, table

  results = {"m": {"fsdp2_tensor4": {"constrained": {"count": 3, "bytes": 2_000_000},
                                     "xla": {"count": 5, "bytes": 5_000_000}}}}
  assert table(results).splitlines()[-1] == "| m | 1×2×4 | 3 / 5 | 2.00 / 5.00 | 2.50× |"
  # a scalar (a summed loss) is one element
  assert collectives("  %all-reduce.3 = f32[] all-reduce(f32[] %loss), to_apply=%add") == {"all-reduce": (1, 4)}


def test_generation_ms_per_token_and_cache_speedup(monkeypatch):
  """ms per new token: the median over repeats of a generation's time over its tokens, with the
  cache and recomputing the window; the cache's speed-up is recompute over cached."""
  import types

  from benchmarks import run

  clock = [0.0]
  per_call = {True: iter([0.0, 2.56, 0.512, 0.256]), False: iter([0.0, 2.56, 5.12, 1.28])}  # compile, 3 repeats

  class Sampler:
    def __init__(self, model, params, temperature):
      assert temperature == 0.0

    def generate(self, prompt, n, key, use_cache, window):
      assert window == 257  # 256 new tokens (the first call: 4, compiling)
      clock[0] += next(per_call[use_cache])

  model = types.SimpleNamespace(init=lambda key, x: {"params": {}})
  monkeypatch.setattr(run, "GEN_CASES", [("toy", None)])
  monkeypatch.setattr(run, "models", types.SimpleNamespace(build=lambda cfg: model))
  monkeypatch.setattr(run, "Sampler", Sampler)
  monkeypatch.setattr(run, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
  [row] = run.jax_generation(None, repeats=3)
  assert row["model"] == "toy"
  assert row["jax_cached_ms"] == pytest.approx(2.0) and row["jax_recompute_ms"] == pytest.approx(10.0)
  assert row["cache_speedup"] == pytest.approx(5.0)


def test_cpu_main_picks_its_sections_and_cases(tmp_path, monkeypatch):
  """--quick: two repeats, every case but the large Transformer, no compile sweep nor recipe;
  --merge keeps the sections not measured again and the peak that goes with their MFU."""
  import sys
  import types

  from benchmarks import run

  calls = []

  class Worker:
    def __init__(self, deterministic=True):
      pass

    def __call__(self, fn, *args):
      calls.append(fn)
      return 123.0 if fn == "matmul_peak" else None

    def close(self):
      pass

  monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(__version__="2.x"))
  monkeypatch.setattr(run, "Worker", Worker)
  monkeypatch.setattr(run, "training_throughput", lambda i, repeats, peak, jaxw, torchw: {"case": i, "r": repeats,
                                                                                           "peak": peak})
  monkeypatch.setattr(run, "data_dependence", lambda i, repeats, jaxw: {"case": i, "r": repeats})
  monkeypatch.setattr(run, "markdown", lambda results: "")
  out = tmp_path / "latest.json"
  out.write_text(json.dumps({"matmul_peak_gflops": 99.0, "compile": [1], "training": [0]}))
  monkeypatch.setattr(sys, "argv", ["run", "--quick", "--merge", "--only", "data,compile,recipe", "--out", str(out)])
  run.main()
  results = json.loads(out.read_text())
  assert results["data"] == [{"case": i, "r": 2} for i in range(len(run.CASES) - 1)]
  assert results["compile"] == [1] and results["training"] == [0] and "recipe" not in results
  assert results["matmul_peak_gflops"] == 99.0 and "compile_time" not in calls
  monkeypatch.setattr(sys, "argv", ["run", "--repeats", "3", "--merge", "--only", "training", "--out", str(out)])
  run.main()
  results = json.loads(out.read_text())
  assert results["training"] == [{"case": i, "r": 3, "peak": 123.0} for i in range(len(run.CASES))]
  assert results["matmul_peak_gflops"] == 123.0
