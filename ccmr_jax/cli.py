"""What every command-line module shares: the user-facing error and its exit.

A :class:`UserError` is a problem the user can fix (a config value, a path, a
dataset, a workdir in use). Commands print it as one line, ``error: ...``,
with no traceback, and exit with status 2.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable

from absl import logging


class UserError(Exception):
  """A problem the user can fix (config, paths, data); commands print it without a traceback."""


def configure_logging() -> None:
  """Progress at INFO; Orbax narrates every save at INFO, so only its warnings and errors pass."""
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(lambda record: "/orbax/" not in record.pathname or record.levelno >= 30)


def exits_on_user_error(*error_types: type[Exception]) -> Callable:
  """Decorates a command's ``main(argv)``: a :class:`UserError` (or one of ``error_types``) exits 2.

  The error is printed as ``error: <message>`` on stderr, nothing else.

  Example::

    @cli.exits_on_user_error(compare.CompareError)
    def main(argv): ...
  """
  caught = (UserError, *error_types)

  def decorate(main: Callable) -> Callable:
    @functools.wraps(main)
    def wrapped(*args, **kwargs):
      try:
        return main(*args, **kwargs)
      except caught as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

    return wrapped

  return decorate
