"""The README's example runs as written and prints a loss for each of the four models."""

from __future__ import annotations

import contextlib
import io
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_example_runs():
  with open(os.path.join(ROOT, "README.md")) as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
  assert blocks, "README has no python example"
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(blocks[0], "README.md", "exec"), {})
  lines = out.getvalue().splitlines()
  assert [line.split()[0] for line in lines] == ["fnn", "rnn", "lstm", "transformer"]
  for line in lines:
    loss = float(line.split()[2])
    assert 3.0 < loss < 6.0  # untrained: near log 65 = 4.17
