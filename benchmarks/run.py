"""nlm-jax against PyTorch on this machine: training throughput, the whole Tiny Shakespeare
recipe, generation, compile time against depth, MFU, the input pipeline, and whether a step's
cost depends on the text it reads.

    python -m benchmarks.run                  # everything on the CPU (~35 min on 2 CPU cores)
    python -m benchmarks.run --quick          # a smoke run: fewer repeats, no large model / recipe
    python -m benchmarks.run --gpu            # the GPU section: nanoGPT's GPU recipe side by side

Training batches are real text: random windows of Tiny Shakespeare (characters) for the
Transformers, of WikiText-2 (words, |V| = 33,278) for the LSTM, RNN and FNN, read from
../shared/data (or the folder $NLM_JAX_BENCH_DATA names). A step whose cost depends on token
statistics (a scatter-add under contention) is invisible on uniform random ids, so the `data`
section times the same step on text, on uniform ids and on one text row repeated B times.

JAX and PyTorch run in separate worker processes, timed alternately, repeat by repeat, on the same
batches, with the same shapes, parameter counts (checked) and optimizer; a number is the median
over repeats after warm-up. The JAX side is the library's own jitted `LMTask.train_step` (what
`nlm-jax train` runs), with the trainer's device settings (deterministic ops: `nlm_jax.runtime`).
Results go to benchmarks/results/latest.json (GPU: gpu.json) and into benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from typing import Optional

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
DATA_DIR = os.environ.get("NLM_JAX_BENCH_DATA", os.path.join(ROOT, "..", "shared", "data"))
SHAKESPEARE = os.path.join(DATA_DIR, "tiny_shakespeare")
RECIPE = os.path.join(ROOT, "experiments", "configs", "shakespeare_char_transformer.yaml")
GPU_RECIPE = os.path.join(ROOT, "experiments", "configs", "shakespeare_char_gpu.yaml")
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "latest.json")
CORPORA = {"shakespeare": ("tiny_shakespeare/input.txt", "char"), "wikitext2": ("wikitext-2/train.txt", "word")}

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
  corpus: str = "shakespeare"  # the real text its batches come from (CORPORA)


CASES = [
    Case("transformer nanoGPT (4×128, T=64, B=12, V=65)",
         models.TransformerConfig(vocab_size=65, d_model=128, n_heads=4, n_layers=4, context=64, use_bias=False),
         12, 64, ADAMW, 20),
    Case("LSTM word_language_model (2×200, T=35, B=20, V=33,278)", models.LSTMConfig(**WLM), 20, 35, SGD, 5,
         "wikitext2"),
    Case("RNN same sizes", models.RNNConfig(**WLM), 20, 35, SGD, 5, "wikitext2"),
    Case("FNN same sizes (n=5, m=h=200)", models.FNNConfig(vocab_size=33278, context=5, d_embed=200, d_hidden=200),
         20, 35, SGD, 3, "wikitext2"),
    Case("transformer large (6×384, 6 heads, T=256, B=16, V=65)",
         models.TransformerConfig(vocab_size=65, d_model=384, n_heads=6, n_layers=6, context=256, use_bias=False),
         16, 256, ADAMW, 3),
]


# nanoGPT's GPU recipe (config/train_shakespeare_char.py) at nlm-jax's bf16 policy.
GPU_CASE = Case("transformer nanoGPT GPU (6×384, 6 heads, T=256, B=64, V=65, dropout 0.2, bf16)",
                models.TransformerConfig(vocab_size=65, d_model=384, n_heads=6, n_layers=6, context=256,
                                         dropout=0.2, use_bias=False, dtype="bfloat16"),
                64, 256, ADAMW, 50)


def median(xs):
  return float(statistics.median(xs))


@functools.cache
def corpus_ids(corpus: str) -> np.ndarray:
  """The training text of `corpus` as token ids, by the project's own tokenizer."""
  from nlm_jax.data import tokenizers

  rel, kind = CORPORA[corpus]
  path = os.path.join(DATA_DIR, rel)
  if not os.path.exists(path):
    raise SystemExit(f"benchmarks: {path} not found; the benchmarks time real text (set NLM_JAX_BENCH_DATA "
                     "to a folder holding tiny_shakespeare/input.txt and wikitext-2/train.txt)")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  tok = tokenizers.CharTokenizer.train(text) if kind == "char" else tokenizers.WordTokenizer.train(text)
  return tok.encode(text).astype(np.int64)


def token_batches(case: Case, data: str, seed: int = 0, n: int = 8) -> np.ndarray:
  """(n, B, T+1) token ids: random windows of the case's real text ('text'), uniform random ids
  ('uniform'), or one text window repeated in every row ('repeated': the most contention)."""
  rng = np.random.default_rng(seed)
  B, T1 = case.batch, case.seq + 1
  if data == "uniform":
    return rng.integers(0, case.cfg.vocab_size, (n, B, T1))
  ids = corpus_ids(case.corpus)
  assert ids.max() < case.cfg.vocab_size, (case.name, int(ids.max()))
  starts = rng.integers(0, len(ids) - T1, (n, B))
  if data == "repeated":
    starts[:] = starts[:, :1]
  elif data != "text":
    raise ValueError(data)
  return ids[starts[..., None] + np.arange(T1)]


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


def matmul_peak(state, n: int = 2048, repeats: int = 10, dtype: str = "float32") -> float:
  """GFLOP/s of a jitted n×n matmul (the MFU denominator): float32 on the CPU, bfloat16 on a GPU."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
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

  def __init__(self, deterministic: bool = True):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    self.conn, child = ctx.Pipe()
    self.proc = ctx.Process(target=_serve, args=(child, deterministic), daemon=True)
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


def _serve(conn, deterministic: bool = True):
  import traceback

  from nlm_jax import runtime

  runtime.configure(deterministic=deterministic)  # as `nlm-jax train` does, before the backend starts
  state: dict = {}
  while (msg := conn.recv()) is not None:
    fn, args = msg
    try:
      conn.send((True, globals()[fn](state, *args)))
    except Exception:  # reported to the parent, which raises
      conn.send((False, traceback.format_exc()))


def _case(case_index) -> Case:
  return GPU_CASE if case_index == "gpu" else CASES[case_index]


def jax_setup(state, case_index, seed: int = 0, data: str = "text", model_overrides: dict | None = None) -> int:
  case = _case(case_index)
  if model_overrides:
    case = dataclasses.replace(case, cfg=dataclasses.replace(case.cfg, **model_overrides))
  task, train_state = jax_task(case)
  state.update(task=task, train_state=train_state, case=case,
               batches=jax_batches(case, token_batches(case, data, seed), task))
  return param_count(train_state.params)


def jax_data(state, data: str, seed: int = 0) -> None:
  """Replaces the batches of the step set up by `jax_setup` (same compiled step)."""
  case, task = state["case"], state["task"]
  state["batches"] = jax_batches(case, token_batches(case, data, seed), task)


def jax_run(state, n: int) -> float:
  task, batches = state["task"], state["batches"]
  t = time.perf_counter()
  for i in range(n):
    state["train_state"], m = task.train_step(state["train_state"], batches[i % len(batches)])
  jax.block_until_ready(m)
  return time.perf_counter() - t


def torch_setup(state, case_index, seed: int = 0, data: str = "text") -> int:
  """The PyTorch side; on a GPU as nanoGPT runs there: float32 parameters, bf16 autocast,
  torch.compile, fused AdamW (the case's dtype says bf16)."""
  import torch

  from benchmarks import torch_reference as tr

  case = _case(case_index)
  tokens = token_batches(case, data, seed)
  torch.manual_seed(seed)
  torch.set_num_threads(os.cpu_count() or 2)
  device = "cuda" if torch.cuda.is_available() and case_index == "gpu" else "cpu"
  bf16 = case.cfg.dtype == "bfloat16"
  cfg = dataclasses.replace(case.cfg, dtype="float32") if bf16 else case.cfg
  model = tr.build_torch(cfg).to(device)
  o = case.optim
  if device == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
  state["step"] = tr.torch_train_step_fn(model, o["name"], lr=o["lr"], weight_decay=o.get("weight_decay", 0.0),
                                         betas=(0.9, o.get("b2", 0.999)), grad_clip=o.get("clip_norm", 0.0),
                                         autocast=torch.bfloat16 if bf16 else None, compile=device == "cuda")
  state["batches"] = [(torch.from_numpy(x[:, :-1]).long().to(device), torch.from_numpy(x[:, 1:]).long().to(device))
                      for x in tokens]
  return tr.count_params(model)


def torch_run(state, n: int) -> float:
  step, batches = state["step"], state["batches"]
  t = time.perf_counter()
  for i in range(n):
    loss = step(*batches[i % len(batches)])
  loss.item()
  return time.perf_counter() - t


def torch_matmul_peak(state, n: int = 8192, repeats: int = 10) -> float:
  """GFLOP/s of PyTorch's bf16 n×n matmul on the GPU (reported beside JAX's)."""
  import torch

  a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
  a @ a
  torch.cuda.synchronize()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    a @ a
    torch.cuda.synchronize()
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / median(times) / 1e9


def data_dependence(case_index, repeats: int, jaxw: Worker, steps: Optional[int] = None,
                    model_overrides: dict | None = None) -> dict:
  """ms per step of the same compiled JAX step on text, uniform ids and a repeated row, alternated."""
  case = _case(case_index)
  steps = steps or case.steps
  jaxw("jax_setup", case_index, 0, "text", model_overrides)
  times = {d: [] for d in ("text", "uniform", "repeated")}
  for d in times:  # warm-up (and compile) on each
    jaxw("jax_data", d)
    jaxw("jax_run", 3)
  for _ in range(repeats):
    for d in times:
      jaxw("jax_data", d)
      times[d].append(1e3 * jaxw("jax_run", steps) / steps)
  ms = {d: median(v) for d, v in times.items()}
  return {"case": case.name, **({"model": model_overrides} if model_overrides else {}),
          **{f"{d}_ms": v for d, v in ms.items()}, "text_vs_uniform": ms["text"] / ms["uniform"],
          "repeated_vs_uniform": ms["repeated"] / ms["uniform"], "repeats": repeats, "steps_per_repeat": steps}


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
      env = dict(os.environ, NLM_JAX_CACHE=os.path.join(tmp, f"cache{i}"))  # tokenizes, compiles every time
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


# ----------------------------------------------------------------------------- GPU


def _summary_of_jax_run(workdir: str, stdout: str) -> dict:
  summary = json.loads(stdout[stdout.index("{"):])
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    evals = [r for r in map(json.loads, f) if "val_loss" in r]
  return {"loop_s": summary["loop_time_s"], "params": summary["params"], "iters": summary["steps"],
          "best_val_loss": min(r["val_loss"] for r in evals), "final_val_loss": evals[-1]["val_loss"],
          "final_train_loss": evals[-1].get("eval_train_loss")}


GPU_TORCH_RECIPE = dict(iters=5000, batch_size=64, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2,
                        eval_iters=200, eval_interval=250, device="cuda", compile=True, dtype="bfloat16")


def gpu_recipe(repeats: int, peak_gflops: float, jax_overrides: tuple = (), torch_kwargs: Optional[dict] = None,
               case: Case = GPU_CASE) -> dict:
  """nanoGPT's GPU recipe, whole, each side in its own process, alternated: `nlm-jax train
  --config experiments/configs/shakespeare_char_gpu.yaml` against nanoGPT's loop run as nanoGPT
  runs on a GPU (torch.compile, bf16 autocast, SDPA, fused AdamW). Both estimate losses the same
  way: 200 fresh random windows of each split every 250 iterations, in eval mode."""
  text = os.path.join(SHAKESPEARE, "input.txt")
  script = ("import json, sys\nfrom benchmarks import torch_reference as tr\n"
            "r = tr.run_nanogpt_shakespeare_char(sys.argv[1], log=False, **json.loads(sys.argv[2]))\n"
            "print(json.dumps({k: r[k] for k in ('wall_s', 'train_s', 'val_loss', 'best_val_loss', 'train_loss',"
            " 'params', 'iters')}))")
  torch_kwargs = {**GPU_TORCH_RECIPE, **(torch_kwargs or {})}

  env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_PREALLOCATE"}  # as a user runs them,
  env["NLM_JAX_COMPILATION_CACHE"] = "0"  # but compiling every time, as the numbers so far were measured

  def timed(argv) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode:
      raise RuntimeError(proc.stderr[-3000:])
    return time.perf_counter() - t, proc.stdout

  jax_runs, torch_runs = [], []
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(repeats):
      workdir = os.path.join(tmp, f"run{i}")
      wall, out = timed([sys.executable, "-m", "nlm_jax", "train", "--config", GPU_RECIPE, f"workdir={workdir}",
                         f"data.file={text}", "train.progress=false", *jax_overrides])
      jax_runs.append({"wall_s": wall, **_summary_of_jax_run(workdir, out)})
      print(json.dumps({"nlm-jax": jax_runs[-1]}), flush=True)
      wall, out = timed([sys.executable, "-c", script, text, json.dumps(torch_kwargs)])
      r = json.loads(out.strip().splitlines()[-1])
      torch_runs.append({"wall_s": wall, "loop_s": r["wall_s"], "params": r["params"], "iters": r["iters"],
                         "best_val_loss": r["best_val_loss"], "final_val_loss": r["val_loss"],
                         "final_train_loss": r["train_loss"]})
      print(json.dumps({"pytorch": torch_runs[-1]}), flush=True)
  assert jax_runs[0]["params"] == torch_runs[0]["params"], (jax_runs[0]["params"], torch_runs[0]["params"])
  flops = model_flops_per_token(case.cfg, jax_runs[0]["params"], case.seq)
  rows = {}
  for side, runs in (("nlm-jax", jax_runs), ("pytorch", torch_runs)):
    row = {k: median([r[k] for r in runs]) for k in ("wall_s", "loop_s", "best_val_loss", "final_val_loss")}
    row["ms_per_iter"] = 1e3 * row["loop_s"] / runs[0]["iters"]
    tokens_per_s = case.batch * case.seq * runs[0]["iters"] / row["loop_s"]
    row["mfu"] = flops * tokens_per_s / (peak_gflops * 1e9)
    rows[side] = row
  return {"sides": rows, "wall_ratio": rows["nlm-jax"]["wall_s"] / rows["pytorch"]["wall_s"], "repeats": repeats,
          "runs": {"nlm-jax": jax_runs, "pytorch": torch_runs}}


def gpu_main(args) -> None:
  """The GPU section: bf16 matmul peak, the nanoGPT GPU step on text / uniform ids / a repeated
  row (deterministic ops on and off; one-hot against gather embedding; cuDNN against XLA
  attention), PyTorch's compiled bf16 step, and the whole recipe side by side."""
  os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # this process and three workers share the GPU
  import torch

  if jax.default_backend() != "gpu" or not torch.cuda.is_available():
    raise SystemExit(f"benchmarks --gpu: needs a GPU for both JAX (backend here: {jax.default_backend()}) and "
                     f"PyTorch (cuda available: {torch.cuda.is_available()}); install with "
                     "pip install -e \".[cuda,bench]\"")
  repeats = args.repeats or 5
  parts = set((args.only or "steps,torch,recipe").split(","))
  if args.quick:
    parts.discard("recipe")
  out = args.out if args.out != DEFAULT_OUT else os.path.join(ROOT, "benchmarks", "results", "gpu.json")
  results = {}
  if args.merge and os.path.exists(out):
    with open(out) as f:
      results = json.load(f)
  results.update({"date": time.strftime("%Y-%m-%d"), "machine": {
      "gpu": jax.devices()[0].device_kind, "cpu": _cpu_model(), "jax": jax.__version__, "torch": torch.__version__,
      "python": platform.python_version()}})

  def save():
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
      json.dump(results, f, indent=2)

  jaxw, torchw = Worker(), Worker()
  results["bf16_peak_gflops"] = jaxw("matmul_peak", 8192, 10, "bfloat16")
  results["torch_bf16_peak_gflops"] = torchw("torch_matmul_peak")
  peak = max(results["bf16_peak_gflops"], results["torch_bf16_peak_gflops"])
  print(f"bf16 matmul peak: JAX {results['bf16_peak_gflops']:.0f}, PyTorch {results['torch_bf16_peak_gflops']:.0f} "
        "GFLOP/s", flush=True)
  flops = model_flops_per_token(GPU_CASE.cfg, param_count(jax.eval_shape(
      lambda: models.build(GPU_CASE.cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]),
      GPU_CASE.seq)
  tokens = GPU_CASE.batch * GPU_CASE.seq

  def mfu(ms: float) -> float:
    return flops * tokens / (ms * 1e-3) / (peak * 1e9)

  if "steps" in parts:
    steps = []
    # (deterministic ops, model overrides): one-hot against gather embedding, XLA against cuDNN attention
    rows = [(True, None), (True, {"embed_method": "gather"}), (True, {"dropout": 0.0, "attention": "xla"}),
            (True, {"dropout": 0.0, "attention": "cudnn"}), (False, None), (False, {"dropout": 0.0, "attention": "cudnn"})]
    for deterministic in (True, False):
      jaxw.close()
      jaxw = Worker(deterministic=deterministic)
      for overrides in [o for d, o in rows if d == deterministic]:
        try:
          row = data_dependence("gpu", repeats, jaxw, model_overrides=overrides)
          row["mfu_text"] = mfu(row["text_ms"])
        except RuntimeError as e:  # e.g. no cuDNN attention for this card or version: a row says so, the rest runs
          lines = [l for l in str(e).splitlines() if "Error:" in l] or str(e).strip().splitlines()
          row = {"model": overrides, "error": lines[-1].strip()[:160]}
          jaxw.close()
          jaxw = Worker(deterministic=deterministic)
        steps.append({"deterministic": deterministic, **row})
        print(json.dumps(steps[-1]), flush=True)
    results["steps"] = steps
    save()
  jaxw.close()
  for row in results.get("steps", []):  # rows merged from an earlier run: against this run's peak
    if "error" not in row and "mfu_text" not in row:
      row["mfu_text"] = mfu(row["text_ms"])
  if "torch" in parts:
    torchw("torch_setup", "gpu")
    torchw("torch_run", 10)  # compile, warm up
    torch_ms = median([1e3 * torchw("torch_run", GPU_CASE.steps) / GPU_CASE.steps for _ in range(repeats)])
    results["torch_step"] = {"ms": torch_ms, "mfu": mfu(torch_ms)}
    print(json.dumps(results["torch_step"]), flush=True)
    save()
  torchw.close()
  if "recipe" in parts:
    results["recipe"] = gpu_recipe(args.gpu_recipe_repeats, peak)
    save()
  table = gpu_markdown(results)
  print(table)
  update_readme(table, "gpu")


def gpu_markdown(results: dict) -> str:
  m = results["machine"]
  peak = max(results["bf16_peak_gflops"], results["torch_bf16_peak_gflops"])
  lines = [f"Measured {results['date']} on **{m['gpu']}** ({m['cpu']}); jax {m['jax']}, torch {m['torch']}. "
           f"bf16 matmul peak (8192², best of JAX {results['bf16_peak_gflops'] / 1e3:.0f} and PyTorch "
           f"{results['torch_bf16_peak_gflops'] / 1e3:.0f}): **{peak / 1e3:.0f} TFLOP/s**.", ""]
  rec = results.get("recipe")
  if rec:
    j, t = rec["sides"]["nlm-jax"], rec["sides"]["pytorch"]
    lines += [f"| nanoGPT's GPU recipe, 5000 iterations (median of {rec['repeats']}, alternated) | nlm-jax | nanoGPT (PyTorch) |",
              "|---|---:|---:|",
              f"| whole run, process start to exit | {j['wall_s']:.1f} s | {t['wall_s']:.1f} s |",
              f"| ms per iteration in the loop (evaluations included) | {j['ms_per_iter']:.2f} | {t['ms_per_iter']:.2f} |",
              f"| best validation loss (200 random windows) | {j['best_val_loss']:.4f} | {t['best_val_loss']:.4f} |",
              f"| final validation loss | {j['final_val_loss']:.4f} | {t['final_val_loss']:.4f} |",
              f"| MFU over the loop | {100 * j['mfu']:.1f}% | {100 * t['mfu']:.1f}% |",
              f"| nlm-jax wall / nanoGPT wall | {rec['wall_ratio']:.2f}× (target ≤ 0.5×) | |", ""]
  lines += ["| train step, B=64 T=256 (ms, median) | text | uniform ids | repeated row | text / uniform | MFU (text) |",
            "|---|---:|---:|---:|---:|---:|"]
  for r in results["steps"]:
    what = "nlm-jax, " + ("deterministic ops" if r["deterministic"] else "non-deterministic ops")
    if r.get("model"):
      what += ", " + ", ".join(f"{k}={v}" for k, v in r["model"].items())
    if "error" in r:
      lines.append(f"| {what} | failed: {r['error']} | | | | |")
      continue
    lines.append(f"| {what} | {r['text_ms']:.2f} | {r['uniform_ms']:.2f} | {r['repeated_ms']:.2f} | "
                 f"{r['text_vs_uniform']:.3f} | {100 * r['mfu_text']:.1f}% |")
  ts = results.get("torch_step")
  if ts:
    lines.append(f"| PyTorch (torch.compile, bf16 autocast, SDPA) | {ts['ms']:.2f} | | | | {100 * ts['mfu']:.1f}% |")
  return "\n".join(lines)


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
  if results.get("data"):
    lines += ["", "| same compiled train step (ms, median) | real text | uniform ids | one row repeated | text / uniform |",
              "|---|---:|---:|---:|---:|"]
    for r in results["data"]:
      lines.append(f"| {r['case']} | {r['text_ms']:.1f} | {r['uniform_ms']:.1f} | {r['repeated_ms']:.1f} | "
                   f"{r['text_vs_uniform']:.3f} |")
  if results.get("pipeline"):
    train_tps = {r["case"].split(" ")[0]: r["jax_tokens_per_s"] for r in results["training"]}
    lines += ["", "| input pipeline (Grain + device put) | tokens/s | × training step |", "|---|---:|---:|"]
    for r, ref in zip(results["pipeline"], ("transformer", "LSTM")):
      lines.append(f"| {r['pipeline']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / train_tps[ref]:.0f}× |")
  return "\n".join(lines)


def update_readme(table: str, section: str = "results") -> None:
  path = os.path.join(ROOT, "benchmarks", "README.md")
  with open(path) as f:
    text = f.read()
  start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
  i, j = text.index(start) + len(start), text.index(end)
  with open(path, "w") as f:
    f.write(text[:i] + "\n" + table + "\n" + text[j:])


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="fewer repeats; no large model, recipe or compile sweep")
  ap.add_argument("--repeats", type=int, default=None)
  ap.add_argument("--only", default=None, help="comma list of: training,data,recipe,generation,compile,pipeline")
  ap.add_argument("--out", default=DEFAULT_OUT)
  ap.add_argument("--merge", action="store_true",
                  help="update the sections measured now in an existing --out file (e.g. after an interrupted run)")
  ap.add_argument("--gpu", action="store_true",
                  help="the GPU section instead (nanoGPT's GPU recipe side by side; --quick: steps only)")
  ap.add_argument("--gpu-recipe-repeats", type=int, default=1, help="whole GPU recipe runs per side")
  args = ap.parse_args()
  if args.gpu:
    return gpu_main(args)
  repeats = args.repeats or (2 if args.quick else 5)
  parts = set((args.only or "training,data,recipe,generation,compile,pipeline").split(","))
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
  if "data" in parts:
    results["data"] = []
    for i in range(len(CASES) - 1 if args.quick else len(CASES)):
      results["data"].append(data_dependence(i, repeats, jaxw))
      print(json.dumps(results["data"][-1]), flush=True)
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
  if not args.quick and all(k in results for k in ("training", "data", "recipe", "generation", "compile", "pipeline")):
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
