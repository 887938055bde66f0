"""nlm-jax against PyTorch on this machine: training throughput, the whole Tiny Shakespeare
recipe, generation, compile time against depth, MFU, and the input pipeline.

    python -m benchmarks.run                  # everything (~30 min on 2 CPU cores)
    python -m benchmarks.run --quick          # a smoke run: fewer repeats, no large model / recipe

JAX and PyTorch are timed alternately in one process, repeat by repeat, on the same random token
batches, with the same shapes, parameter counts (checked) and optimizer; a number is the median
over repeats after warm-up. The JAX side is the library's own jitted `LMTask.train_step` (what
`nlm-jax train` runs), not a benchmark-only variant. Results go to benchmarks/results/latest.json
and into the table of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from nlm_jax import models, parallel
from nlm_jax.config import OptimConfig
from nlm_jax.data import pipeline
from nlm_jax.generate import Sampler
from nlm_jax.training import optim
from nlm_jax.training.steps import LMTask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(ROOT, "..", "shared", "data", "tiny_shakespeare")
RECIPE = os.path.join(ROOT, "experiments", "configs", "shakespeare_char_transformer.yaml")

ADAMW = dict(name="adamw", lr=1e-3, b2=0.99, weight_decay=0.1, clip_norm=1.0)  # nanoGPT
SGD = dict(name="sgd", lr=20.0, clip_norm=0.25)  # word_language_model
WLM = dict(vocab_size=33278, d_embed=200, d_hidden=200, n_layers=2, dropout=0.2)


@dataclasses.dataclass
class Case:
  name: str
  cfg: object
  batch: int
  seq: int
  optim: dict
  steps: int  # steps per timed repeat


CASES = [
    Case("transformer nanoGPT (4×128, T=64, B=12, V=65)",
         models.TransformerConfig(vocab_size=65, d_model=128, n_heads=4, n_layers=4, context=64, use_bias=False),
         12, 64, ADAMW, 20),
    Case("LSTM word_language_model (2×200, T=35, B=20, V=33,278)", models.LSTMConfig(**WLM), 20, 35, SGD, 5),
    Case("RNN same sizes", models.RNNConfig(**WLM), 20, 35, SGD, 5),
    Case("FNN same sizes (n=5, m=h=200)", models.FNNConfig(vocab_size=33278, context=5, d_embed=200, d_hidden=200),
         20, 35, SGD, 3),
    Case("transformer large (6×384, 6 heads, T=256, B=16, V=65)",
         models.TransformerConfig(vocab_size=65, d_model=384, n_heads=6, n_layers=6, context=256, use_bias=False),
         16, 256, ADAMW, 3),
]


def median(xs):
  return float(statistics.median(xs))


# ----------------------------------------------------------------------------- JAX side


def jax_task(case: Case):
  cfg = OptimConfig(**case.optim)
  carry = case.cfg.arch != "transformer"
  task = LMTask(models.build(case.cfg), optim.make_optimizer(cfg, 10_000), optim.plateau(cfg),
                parallel.make_mesh(), case.batch, carry, example_len=case.seq)
  state = task.init(jax.random.key_data(jax.random.key(0)))
  return task, state


def jax_batches(case: Case, tokens: np.ndarray, task: LMTask):
  out = []
  for x in tokens:
    b = {"inputs": x[:, :-1].astype(np.int32), "targets": x[:, 1:].astype(np.int32),
         "mask": np.ones((case.batch, case.seq), np.float32), "reset": np.zeros((case.batch,), bool)}
    out.append(parallel.global_batch(b, task.batch_sharding, case.batch))
  return out


def param_count(tree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))


def model_flops_per_token(cfg, n_params: int, seq_len: int) -> float:
  """6N + 12·L·d·T for a Transformer (PaLM, appendix B), 6N otherwise. N counts the parameters
  that take part in matrix products: not the position table, nor an input embedding table that
  is only looked up (an untied one)."""
  lookup = 0
  if cfg.arch == "transformer":
    lookup += cfg.context * cfg.d_model if cfg.pos_encoding == "learned" else 0
    lookup += 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    return 6.0 * (n_params - lookup) + 12.0 * cfg.n_layers * cfg.d_model * seq_len
  if cfg.arch == "fnn" or not cfg.tie_embeddings:
    lookup = cfg.vocab_size * cfg.d_embed
  return 6.0 * (n_params - lookup)


def ping(state) -> bool:
  return True


# ----------------------------------------------------------------------------- measurements


def matmul_peak(state, n: int = 2048, repeats: int = 10) -> float:
  """GFLOP/s of a jitted float32 n×n matmul (the MFU denominator)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / median(times) / 1e9


class Worker:
  """A child process that runs this module's functions on request, so that JAX and PyTorch never
  share a process: on 2 cores each framework's idle worker threads (spin-waiting after their last
  operation) slow the other by 10–30%. The parent only orchestrates."""

  def __init__(self):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    self.conn, child = ctx.Pipe()
    self.proc = ctx.Process(target=_serve, args=(child,), daemon=True)
    self.proc.start()

  def __call__(self, fn: str, *args):
    self.conn.send((fn, args))
    ok, value = self.conn.recv()
    if not ok:
      raise RuntimeError(value)
    return value

  def close(self):
    self.conn.send(None)
    self.proc.join(timeout=30)


def _serve(conn):
  import traceback

  state: dict = {}
  while (msg := conn.recv()) is not None:
    fn, args = msg
    try:
      conn.send((True, globals()[fn](state, *args)))
    except Exception:  # reported to the parent, which raises
      conn.send((False, traceback.format_exc()))


def jax_setup(state, case_index: int, seed: int = 0) -> int:
  case = CASES[case_index]
  tokens = np.random.default_rng(seed).integers(0, case.cfg.vocab_size, (8, case.batch, case.seq + 1))
  task, train_state = jax_task(case)
  state.update(task=task, train_state=train_state, batches=jax_batches(case, tokens, task))
  return param_count(train_state.params)


def jax_run(state, n: int) -> float:
  task, batches = state["task"], state["batches"]
  t = time.perf_counter()
  for i in range(n):
    state["train_state"], m = task.train_step(state["train_state"], batches[i % len(batches)])
  jax.block_until_ready(m)
  return time.perf_counter() - t


def torch_setup(state, case_index: int, seed: int = 0) -> int:
  import torch

  from benchmarks import torch_reference as tr

  case = CASES[case_index]
  tokens = np.random.default_rng(seed).integers(0, case.cfg.vocab_size, (8, case.batch, case.seq + 1))
  torch.manual_seed(seed)
  torch.set_num_threads(os.cpu_count() or 2)
  model = tr.build_torch(case.cfg)
  o = case.optim
  state["step"] = tr.torch_train_step_fn(model, o["name"], lr=o["lr"], weight_decay=o.get("weight_decay", 0.0),
                                         betas=(0.9, o.get("b2", 0.999)), grad_clip=o.get("clip_norm", 0.0))
  state["batches"] = [(torch.from_numpy(x[:, :-1]).long(), torch.from_numpy(x[:, 1:]).long()) for x in tokens]
  return tr.count_params(model)


def torch_run(state, n: int) -> float:
  step, batches = state["step"], state["batches"]
  t = time.perf_counter()
  for i in range(n):
    loss = step(*batches[i % len(batches)])
  loss.item()
  return time.perf_counter() - t


def training_throughput(case_index: int, repeats: int, peak: float, jaxw: Worker, torchw: Worker) -> dict:
  case = CASES[case_index]
  n_jax, n_torch = jaxw("jax_setup", case_index), torchw("torch_setup", case_index)
  assert n_jax == n_torch, (case.name, n_jax, n_torch)  # the same model on both sides
  jaxw("jax_run", 3)  # compile and warm up
  torchw("torch_run", 3)
  jt, tt, peaks = [], [], [peak]
  for _ in range(repeats):
    jt.append(jaxw("jax_run", case.steps))
    tt.append(torchw("torch_run", case.steps))
    peaks.append(jaxw("matmul_peak", 2048, 3))  # the machine's speed drifts: re-measure alongside
  peak = median(peaks)
  tokens_per_step = case.batch * case.seq
  jax_tps = tokens_per_step * case.steps / median(jt)
  torch_tps = tokens_per_step * case.steps / median(tt)
  flops = model_flops_per_token(case.cfg, n_jax, case.seq)
  return {"case": case.name, "params": n_jax, "jax_tokens_per_s": jax_tps, "torch_tokens_per_s": torch_tps,
          "speedup": jax_tps / torch_tps, "jax_ms_per_step": 1e3 * median(jt) / case.steps,
          "torch_ms_per_step": 1e3 * median(tt) / case.steps, "flops_per_token": flops,
          "jax_mfu": flops * jax_tps / (peak * 1e9), "torch_mfu": flops * torch_tps / (peak * 1e9),
          "matmul_peak_gflops": peak, "repeats": repeats, "steps_per_repeat": case.steps}


GEN_CASES = [("transformer (4×128, V=65)",
              models.TransformerConfig(vocab_size=65, d_model=128, n_heads=4, n_layers=4, context=512)),
             ("LSTM (2×200, V=33,278)", models.LSTMConfig(**WLM)),
             ("RNN (2×200, V=33,278)", models.RNNConfig(**WLM))]


def jax_generation(state, repeats: int, new_tokens: int = 256) -> list[dict]:
  """ms per token for `new_tokens` greedy tokens from a 1-token prompt: KV cache / carried state
  against recomputing the whole context (a fixed window of new_tokens + 1, compiled once)."""
  rows = []
  for name, cfg in GEN_CASES:
    model = models.build(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    sampler = Sampler(model, params, temperature=0.0)

    def timed(use_cache):
      sampler.generate([1], 4, jax.random.key(0), use_cache=use_cache, window=new_tokens + 1)  # compile
      ms = []
      for _ in range(repeats):
        t = time.perf_counter()
        sampler.generate([1], new_tokens, jax.random.key(0), use_cache=use_cache, window=new_tokens + 1)
        ms.append(1e3 * (time.perf_counter() - t) / new_tokens)
      return median(ms)

    cached, full = timed(True), timed(False)
    rows.append({"model": name, "jax_cached_ms": cached, "jax_recompute_ms": full, "cache_speedup": full / cached})
  return rows


def torch_generation(state, repeats: int, new_tokens: int = 256) -> list[dict]:
  from benchmarks import torch_reference as tr

  rows = []
  for name, cfg in GEN_CASES:
    is_t = cfg.arch == "transformer"
    cached = median(tr.torch_generate_ms_per_token(cfg, new_tokens, kv_cache=is_t, repeats=repeats))
    full = median(tr.torch_generate_ms_per_token(cfg, new_tokens, repeats=repeats)) if is_t else None
    rows.append({"torch_cached_ms": cached, "torch_recompute_ms": full})
  return rows


def compile_time(state, depths=(2, 6, 12, 24)) -> list[dict]:
  """Seconds from building the step to the first step's result, with and without nn.scan."""
  rows = []
  for scan in (False, True):
    for L in depths:
      cfg = models.TransformerConfig(vocab_size=65, d_model=128, n_heads=4, n_layers=L, context=64,
                                     use_bias=False, scan_layers=scan)
      case = Case("", cfg, 12, 64, ADAMW, 1)
      t = time.perf_counter()
      task, state = jax_task(case)
      batch = jax_batches(case, np.zeros((1, 12, 65), np.int64), task)[0]
      state, m = task.train_step(state, batch)
      jax.block_until_ready(m)
      rows.append({"layers": L, "scan": scan, "seconds": time.perf_counter() - t})
  return rows


def input_pipeline(state, repeats: int) -> list[dict]:
  """Tokens/s of the Grain iterators (with the device put) against the training step's."""
  rows = []
  tokens = np.random.default_rng(0).integers(0, 65, 1_000_000).astype(np.int32)
  mesh = parallel.make_mesh()
  sharding = parallel.batch_sharding(mesh)
  for name, make, B, T in (("windows B=12 T=64", lambda: pipeline.random_windows(tokens, 12, 64, 0), 12, 64),
                           ("streams B=20 T=35", lambda: pipeline.contiguous_streams(tokens, 20, 35), 20, 35)):
    it = iter(make())
    for _ in range(20):
      next(it)
    rates = []
    for _ in range(repeats):
      t = time.perf_counter()
      for _ in range(500):
        b = parallel.global_batch(next(it), sharding, B)
      jax.block_until_ready(b)
      rates.append(500 * B * T / (time.perf_counter() - t))
    rows.append({"pipeline": name, "tokens_per_s": median(rates)})
  return rows


def recipe_wall_time(repeats: int = 2) -> dict:
  """The whole Tiny Shakespeare recipe, each side in its own process, alternately (`repeats`
  times each, median): `nlm-jax train` against nanoGPT's loop in PyTorch. Wall times run from
  process start to exit (imports, reading and tokenizing the text, compilation, training,
  evaluations); loop times leave out what comes before the first step (PyTorch's is nanoGPT's
  own timing of its loop)."""
  text = os.path.join(SHAKESPEARE, "input.txt")
  if not os.path.exists(text):
    return {"skipped": f"no {text}"}
  script = ("import json, sys\nfrom benchmarks import torch_reference as tr\n"
            "r = tr.run_nanogpt_shakespeare_char(sys.argv[1], log=False)\n"
            "print(json.dumps({'wall_s': r['wall_s'], 'val_loss': r['val_loss']}))")

  def timed(argv, env=None) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
      raise RuntimeError(proc.stderr[-2000:])
    return time.perf_counter() - t, proc.stdout

  runs = {"jax_wall_s": [], "jax_loop_s": [], "torch_wall_s": [], "torch_loop_s": []}
  with tempfile.TemporaryDirectory() as tmp:
    tfds_dir = os.path.join(tmp, "tfds")
    subprocess.run([sys.executable, "-m", "nlm_jax", "data", "prepare", "tiny_shakespeare", "--manual-dir",
                    SHAKESPEARE, "--data-dir", tfds_dir], check=True, capture_output=True,
                   env=dict(os.environ, NLM_JAX_CACHE=os.path.join(tmp, "cache")))
    for i in range(repeats):
      env = dict(os.environ, NLM_JAX_CACHE=os.path.join(tmp, f"cache{i}"))  # tokenizes every time, as PyTorch does
      wall, out = timed([sys.executable, "-m", "nlm_jax", "train", "--config", RECIPE,
                         f"workdir={os.path.join(tmp, f'run{i}')}", f"data.data_dir={tfds_dir}",
                         "train.progress=false"], env)
      summary = json.loads(out[out.index("{"):])
      runs["jax_wall_s"].append(wall)
      runs["jax_loop_s"].append(summary["loop_time_s"])
      wall, out = timed([sys.executable, "-c", script, text])
      torch_run = json.loads(out.strip().splitlines()[-1])
      runs["torch_wall_s"].append(wall)
      runs["torch_loop_s"].append(torch_run["wall_s"])
      print(json.dumps({k: v[-1] for k, v in runs.items()}), flush=True)
  out = {k: median(v) for k, v in runs.items()}
  out.update({"jax_val_loss": summary["final_validation_loss"], "torch_val_loss": torch_run["val_loss"],
              "speedup": out["torch_wall_s"] / out["jax_wall_s"],
              "loop_speedup": out["torch_loop_s"] / out["jax_loop_s"], "repeats": repeats, "runs": runs})
  return out


# ----------------------------------------------------------------------------- report


def markdown(results: dict) -> str:
  m = results["machine"]
  lines = [f"Measured {results['date']} on {m['cpu']} ({m['cores']} cores), {m['backend']}; "
           f"jax {m['jax']}, torch {m['torch']}. Matmul peak (float32 2048², JAX): "
           f"**{results['matmul_peak_gflops']:.0f} GFLOP/s**.", "",
           "| training (median of repeats) | params | nlm-jax tok/s | PyTorch tok/s | speed-up | MFU nlm-jax | MFU PyTorch |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for r in results["training"]:
    lines.append(f"| {r['case']} | {r['params']:,} | {r['jax_tokens_per_s']:,.0f} | {r['torch_tokens_per_s']:,.0f} "
                 f"| {r['speedup']:.2f}× | {100 * r['jax_mfu']:.0f}% | {100 * r['torch_mfu']:.0f}% |")
  rec = results.get("recipe")
  if rec and "skipped" not in rec:
    lines += ["", f"| whole Tiny Shakespeare recipe (2000 iterations + validation; median of {rec.get('repeats', 1)}, alternated) | process start to exit | training loop | final val loss |",
              "|---|---:|---:|---:|",
              f"| `nlm-jax train` | {rec['jax_wall_s']:.0f} s | {rec['jax_loop_s']:.0f} s | {rec['jax_val_loss']:.4f} |",
              f"| nanoGPT's loop in PyTorch | {rec['torch_wall_s']:.0f} s | {rec['torch_loop_s']:.0f} s | {rec['torch_val_loss']:.4f} |",
              f"| speed-up | {rec['speedup']:.2f}× | {rec['loop_speedup']:.2f}× | |"]
  if results.get("generation"):
    lines += ["", "| generation, 256 new tokens (ms/token) | nlm-jax cached | nlm-jax recompute | cache speed-up | PyTorch cached | PyTorch recompute |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in results["generation"]:
      tf = "—" if r["torch_recompute_ms"] is None else f"{r['torch_recompute_ms']:.2f}"
      lines.append(f"| {r['model']} | {r['jax_cached_ms']:.2f} | {r['jax_recompute_ms']:.2f} | "
                   f"{r['cache_speedup']:.1f}× | {r['torch_cached_ms']:.2f} | {tf} |")
  if results.get("compile"):
    by = {(r["layers"], r["scan"]): r["seconds"] for r in results["compile"]}
    depths = sorted({r["layers"] for r in results["compile"]})
    lines += ["", "| time to first step (s) | " + " | ".join(f"L={d}" for d in depths) + " |",
              "|---|" + "---:|" * len(depths)]
    for scan in (False, True):
      lines.append(f"| {'nn.scan over layers' if scan else 'unrolled layers'} | "
                   + " | ".join(f"{by[(d, scan)]:.1f}" for d in depths) + " |")
  if results.get("pipeline"):
    train_tps = {r["case"].split(" ")[0]: r["jax_tokens_per_s"] for r in results["training"]}
    lines += ["", "| input pipeline (Grain + device put) | tokens/s | × training step |", "|---|---:|---:|"]
    for r, ref in zip(results["pipeline"], ("transformer", "LSTM")):
      lines.append(f"| {r['pipeline']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / train_tps[ref]:.0f}× |")
  return "\n".join(lines)


def update_readme(table: str) -> None:
  path = os.path.join(ROOT, "benchmarks", "README.md")
  with open(path) as f:
    text = f.read()
  start, end = "<!-- results:start -->", "<!-- results:end -->"
  i, j = text.index(start) + len(start), text.index(end)
  with open(path, "w") as f:
    f.write(text[:i] + "\n" + table + "\n" + text[j:])


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="fewer repeats; no large model, recipe or compile sweep")
  ap.add_argument("--repeats", type=int, default=None)
  ap.add_argument("--only", default=None, help="comma list of: training,recipe,generation,compile,pipeline")
  ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "latest.json"))
  ap.add_argument("--merge", action="store_true",
                  help="update the sections measured now in an existing --out file (e.g. after an interrupted run)")
  args = ap.parse_args()
  repeats = args.repeats or (2 if args.quick else 5)
  parts = set((args.only or "training,recipe,generation,compile,pipeline").split(","))
  if args.quick:
    parts -= {"recipe", "compile"}
  import torch

  results = {}
  if args.merge and os.path.exists(args.out):
    with open(args.out) as f:
      results = json.load(f)
  results.update({"date": time.strftime("%Y-%m-%d"), "machine": {
      "cpu": _cpu_model(), "cores": os.cpu_count(), "backend": jax.default_backend(),
      "jax": jax.__version__, "torch": torch.__version__, "python": platform.python_version()}})

  def save() -> None:  # after every section, so that an interrupted run keeps what it measured
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)
  jaxw, torchw = Worker(), Worker()
  jaxw("ping"), torchw("ping")  # both started (imports done) before anything is timed
  peak = jaxw("matmul_peak")
  print(f"matmul peak {peak:.0f} GFLOP/s", flush=True)
  if "training" in parts or "matmul_peak_gflops" not in results:  # the header's peak goes with the MFU table
    results["matmul_peak_gflops"] = peak
  if "training" in parts:
    results["training"] = []
    for i in range(len(CASES) - 1 if args.quick else len(CASES)):
      r = training_throughput(i, repeats, results["matmul_peak_gflops"], jaxw, torchw)
      print(json.dumps(r), flush=True)
      results["training"].append(r)
      save()
  if "generation" in parts:
    rows = jaxw("jax_generation", repeats)
    for row, torch_row in zip(rows, torchw("torch_generation", repeats)):
      row.update(torch_row)
    results["generation"] = rows
    print(json.dumps(rows), flush=True)
    save()
  if "pipeline" in parts:
    results["pipeline"] = jaxw("input_pipeline", repeats)
    print(json.dumps(results["pipeline"]), flush=True)
    save()
  jaxw.close()
  torchw.close()
  if "compile" in parts:
    fresh = Worker()  # nothing compiled before
    results["compile"] = fresh("compile_time")
    fresh.close()
    print(json.dumps(results["compile"]), flush=True)
    save()
  if "recipe" in parts:
    results["recipe"] = recipe_wall_time()
    print(json.dumps(results["recipe"]), flush=True)
    save()
  save()
  table = markdown(results)
  print(table)
  if not args.quick and all(k in results for k in ("training", "recipe", "generation", "compile", "pipeline")):
    update_readme(table)


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.machine()


if __name__ == "__main__":
  main()
