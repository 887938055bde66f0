"""The one exception class for user mistakes: the CLI prints its message on one line and exits 2;
and the one form of a warning."""

import sys


class UserError(Exception):
  """A problem with the user's input (config, file, data, run directory), not a bug."""


def warn(message: str) -> None:
  print(f"nlm-jax: warning: {message}", file=sys.stderr)
