"""What the train step sends between devices, per mesh, with and without the activation constraints.

    python -m benchmarks.collectives           # 8 simulated CPU devices; ~5 min on 2 CPU cores
    python -m benchmarks.collectives --quick   # small models: the code path in a minute

For each model and (data, fsdp, tensor) mesh, the library's own `LMTask.train_step` is compiled
twice, with `mesh.activation_sharding` on (the default: `layers.constrain` pins the activations'
layouts to the logical-axis rules) and off (XLA's sharding propagation alone), and the collectives
of the compiled SPMD program are counted: how many, and the bytes of their results per device.
These counts are properties of the compiled program, not timings: they need no accelerator, and
XLA partitions a program the same way for CPU and GPU devices (its GPU passes may then combine or
overlap collectives differently, which only a GPU run measures). Results go to
benchmarks/results/collectives.json and into the table in benchmarks/README.md.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # before JAX starts; not when imported (a test's later subprocesses would inherit it)
  os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"])

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from nlm_jax import models, parallel  # noqa: E402
from nlm_jax.config import OptimConfig  # noqa: E402
from nlm_jax.training import optim  # noqa: E402
from nlm_jax.training.steps import LMTask  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
MESHES = {"data8": (8, 1, 1), "fsdp8": (1, 8, 1), "data2_tensor4": (2, 1, 4), "fsdp2_tensor4": (1, 2, 4),
          "data2_fsdp2_tensor2": (2, 2, 2)}
# (name, model config, batch B, length T): the benchmarks' large Transformer and a word-level LSTM
MODELS = {
    "transformer 6×384 (T=256, B=16, V=65)": (
        models.TransformerConfig(vocab_size=65, d_model=384, n_heads=6, n_layers=6, d_ff=1536, context=256), 16, 256),
    "LSTM 2×650 (T=35, B=32, V=33,280)": (
        models.LSTMConfig(vocab_size=33280, d_embed=650, d_hidden=650, n_layers=2), 32, 35),
}
QUICK = {
    "transformer 2×64 (T=32, B=16, V=512)": (
        models.TransformerConfig(vocab_size=512, d_model=64, n_heads=4, n_layers=2, d_ff=256, context=32), 16, 32),
    "LSTM 2×64 (T=16, B=16, V=512)": (models.LSTMConfig(vocab_size=512, d_embed=64, d_hidden=64), 16, 16),
}


def element_bits(dtype: str) -> int:
  """Bits of one element of an HLO type: pred 8 (a byte), else the width its name starts with
  (s4 4, f8e4m3fn 8, bf16 16, c64 64: the complex pair); 0 for token and other non-arrays."""
  if dtype == "pred":
    return 8
  m = re.match(r"[a-z]+(\d+)", dtype)
  return int(m.group(1)) if m else 0


def collectives(hlo: str) -> dict[str, tuple[int, int]]:
  """{collective: (count, bytes of its results)} of a compiled HLO module's text (an async pair,
  `-start`/`-done`, counted once, by its `-done`, whose result is the output alone)."""
  out = {c: [0, 0] for c in COLLECTIVES}
  for line in hlo.splitlines():
    m = re.search(r"=\s+(.*?)\s+(" + "|".join(COLLECTIVES) + r")(-start|-done)?\(", line)
    if not m or m.group(3) == "-start":
      continue
    bits = 0
    for dtype, dims in re.findall(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]", m.group(1)):
      bits += element_bits(dtype) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    out[m.group(2)][0] += 1
    out[m.group(2)][1] += -(-bits // 8)
  return {c: tuple(v) for c, v in out.items() if v[0]}


def measure(model_cfg, B: int, T: int, mesh_shape, activation_sharding: bool) -> dict:
  mesh = parallel.make_mesh(*mesh_shape)
  cfg = OptimConfig(name="adamw", lr=1e-3, weight_decay=0.1, clip_norm=1.0)
  recurrent = model_cfg.arch in ("rnn", "lstm")
  task = LMTask(models.build(model_cfg), optim.make_optimizer(cfg, 100), optim.plateau(cfg), mesh, B,
                carry_state=recurrent, example_len=min(T, 8), activation_sharding=activation_sharding)
  shapes = {"inputs": ((B, T), jnp.int32), "targets": ((B, T), jnp.int32), "mask": ((B, T), jnp.float32),
            "reset": ((B,), jnp.bool_)}
  batch = {k: jax.ShapeDtypeStruct(*shapes[k], sharding=task.batch_sharding) for k in task.batch_keys}
  t0 = time.perf_counter()
  hlo = task.train_step.lower(task.abstract_state, batch).compile().as_text()
  found = collectives(hlo)
  return {"collectives": found, "count": sum(c for c, _ in found.values()),
          "bytes": sum(b for _, b in found.values()), "compile_s": round(time.perf_counter() - t0, 1)}


def table(results: dict) -> str:
  lines = ["| model | mesh (data×fsdp×tensor) | collectives: constrained / XLA alone | MB per device per step: "
           "constrained / XLA alone | ratio |", "|---|---|---:|---:|---:|"]
  for name, per_mesh in results.items():
    for mesh_name, r in per_mesh.items():
      on, off = r["constrained"], r["xla"]
      shape = "×".join(map(str, MESHES[mesh_name]))
      ratio = off["bytes"] / on["bytes"] if on["bytes"] else float("nan")
      lines.append(f"| {name} | {shape} | {on['count']} / {off['count']} | "
                   f"{on['bytes'] / 1e6:.2f} / {off['bytes'] / 1e6:.2f} | {ratio:.2f}× |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="small models (the code path, not the numbers)")
  parser.add_argument("--out", default=os.path.join(HERE, "results", "collectives.json"))
  args = parser.parse_args(argv)
  assert jax.device_count() == 8, f"needs 8 devices, found {jax.device_count()} (XLA_FLAGS set too late?)"
  results = {}
  for name, (model_cfg, B, T) in (QUICK if args.quick else MODELS).items():
    results[name] = {}
    for mesh_name, shape in MESHES.items():
      results[name][mesh_name] = {"constrained": measure(model_cfg, B, T, shape, True),
                                  "xla": measure(model_cfg, B, T, shape, False)}
      print(name, mesh_name, {k: (v["count"], v["bytes"]) for k, v in results[name][mesh_name].items()}, flush=True)
  text = table(results)
  print(text)
  if not args.quick:
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump({"jax": jax.__version__, "date": time.strftime("%Y-%m-%d"), "results": results}, f, indent=1)
    readme = os.path.join(HERE, "README.md")
    with open(readme) as f:
      doc = f.read()
    start, end = "<!-- collectives:start -->", "<!-- collectives:end -->"
    if start in doc and end in doc:
      head, rest = doc.split(start, 1)
      doc = head + start + "\n" + text + "\n" + end + rest.split(end, 1)[1]
      with open(readme, "w") as f:
        f.write(doc)


if __name__ == "__main__":
  main()
