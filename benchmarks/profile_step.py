"""Where a training step's time goes: a `jax.profiler` trace of the library's own jitted
`LMTask.train_step` for one of the benchmark's cases, with XLA's op names mapped back to the
model's ops through the compiled HLO.

    python -m benchmarks.profile_step 4            # case index in benchmarks.run.CASES (4 = large Transformer)
    python -m benchmarks.profile_step 1 --top 40   # the LSTM

Op times are summed over XLA's threads, so they can exceed the wall time of a step.
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import tempfile

import jax

from benchmarks.run import CASES, jax_run, jax_setup


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("case", type=int, help=" / ".join(f"{i}: {c.name}" for i, c in enumerate(CASES)))
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--top", type=int, default=25)
  args = ap.parse_args()
  case = CASES[args.case]
  state: dict = {}
  jax_setup(state, args.case)  # the benchmark's own task, state and batches
  jax_run(state, 2)  # compile, warm up
  print(f"{case.name}: {jax_run(state, args.steps) / args.steps * 1e3:.0f} ms per step")

  from jax.profiler import ProfileData

  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    jax_run(state, args.steps)
    jax.profiler.stop_trace()
    data = ProfileData.from_file(sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1])
    by_op, by_kind, count = collections.Counter(), collections.Counter(), collections.Counter()
    for plane in data.planes:
      for line in plane.lines:
        if "python" in line.name.lower():
          continue
        for ev in line.events:
          if "Thunk" in ev.name or "Await" in ev.name:
            continue
          by_op[ev.name] += ev.duration_ns
          by_kind[re.sub(r"[.\d]+$", "", ev.name)] += ev.duration_ns
          count[ev.name] += 1
  hlo = state["task"].train_step.lower(state["train_state"], state["batches"][0]).compile().as_text()
  n = args.steps
  print(f"{sum(count.values()) / n:.0f} op executions per step, {sum(by_op.values()) / 1e6 / n:.0f} ms op time per step")
  print("by kind (ms/step):", {k: round(v / 1e6 / n, 1) for k, v in by_kind.most_common(12)})
  for name, ns in by_op.most_common(args.top):
    m = re.search(r"\n\s*%?" + re.escape(name) + r" = ([^\n]*)", hlo)
    shape = m.group(1).split(" ")[0] if m else ""
    op = re.search(r'op_name="([^"]*)"', m.group(1)) if m else None
    print(f"{ns / 1e6 / n:8.2f} ms  {name:28s} {shape:26s} {op.group(1)[-64:] if op else ''}")


if __name__ == "__main__":
  main()
