"""Reading the user's text files: UTF-8 or a one-line error that names the file and the problem."""

from __future__ import annotations

from nlm_jax.errors import UserError


def read_text(path: str, what: str = "data file") -> str:
  """The UTF-8 text of `path`, without a leading byte-order mark (editors on Windows write one: it
  is not text, and it would become a token, or hide a TSV's header); a missing file, a directory or
  bytes that are not UTF-8 raise a one-line `UserError` that starts with `what` (the setting the
  path came from) and names `path`."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except FileNotFoundError:
    raise UserError(f"{what} not found: {path}") from None
  except IsADirectoryError:
    raise UserError(f"{what} is a directory: {path}") from None
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise UserError(f"{what} {path} is not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
  return text[1:] if text.startswith("\ufeff") else text
