"""Progress bars: one kind for every wait (training, evaluation, reading and tokenizing data)."""

from __future__ import annotations


def bar(enabled: bool, iterable=None, **kwargs):
  """A tqdm bar on stderr that appears only once the wait passes `delay` seconds (default 2);
  `enabled=False` gives a bar that prints nothing, with the same methods."""
  from tqdm import tqdm

  kwargs.setdefault("delay", 2.0)
  kwargs.setdefault("leave", False)
  return tqdm(iterable, disable=not enabled, dynamic_ncols=True, **kwargs)
