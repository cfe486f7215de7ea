"""What every command-line module shares: the user-facing error and its exit.

A :class:`UserError` is a problem the user can fix (a config value, a path, a
dataset, a workdir in use). Commands print it as one line, ``error: ...``,
with no traceback, and exit with status 2. Commands start through
:func:`run`, so flag errors do the same: an unknown flag, a malformed value,
a ``--config`` file that is missing or does not load, an override of a
config field that does not exist.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, Sequence

from absl import app, flags, logging


class UserError(Exception):
  """A problem the user can fix (config, paths, data); commands print it without a traceback."""


def _user_exit(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _last_line(error: Exception) -> str:
  """The last non-empty line of an error's message (config loaders nest the cause at the end)."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[-1] if lines else type(error).__name__


def _config_error(error: Exception, name: str = "config") -> str:
  if isinstance(error, (AttributeError, KeyError)):
    field = _last_line(error).strip("\"'")
    return f"--{name}: an override names a field the config does not have ({field!r}); check the --{name}.* flags"
  return f"--{name}: cannot load it ({type(error).__name__}: {_last_line(error)}); check the file"


def parse_flags(argv: Sequence[str]) -> list[str]:
  """Parses ``argv`` into ``flags.FLAGS`` and loads every config flag; a bad flag exits 2 with one line."""
  try:
    remaining = flags.FLAGS(argv)
  except flags.Error as e:
    _user_exit(f"{_last_line(e)}; see --helpshort")
  except Exception as e:  # noqa: BLE001 - a config file (user code) or an override that does not apply to it
    _user_exit(_config_error(e))
  for name in list(flags.FLAGS):
    try:
      # A config file that failed to load is a placeholder that raises on any attribute.
      getattr(flags.FLAGS[name].value, "__ccmr_probe__", None)
    except Exception as e:  # noqa: BLE001 - config files are user code: any error is the user's to fix
      _user_exit(_config_error(e, name))
  return remaining


def define_config_file(name: str, default: str | None, help_string: str, **kwargs):
  """``config_flags.DEFINE_config_file``, but a bad ``--NAME.field=value`` override exits 2 with one line.

  With no ``--NAME=`` on the command line the default file is loaded, and its
  overrides applied, while the flag is defined.
  """
  from ml_collections import config_flags  # noqa: PLC0415 - only commands with a config need it

  try:
    return config_flags.DEFINE_config_file(name, default, help_string, lock_config=True, **kwargs)
  except Exception as e:  # noqa: BLE001 - as in parse_flags
    _user_exit(_config_error(e, name))


def run(main: Callable) -> None:
  """Starts a command: ``absl.app.run(main)`` with :func:`parse_flags` as its flag parser."""
  app.run(main, flags_parser=parse_flags)


def configure_logging() -> None:
  """Progress at INFO; Orbax narrates every save at INFO, so only its warnings and errors pass."""
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(lambda record: "/orbax/" not in record.pathname or record.levelno >= 30)


def write_outputs(write: Callable[[str], Sequence[str]], out: str) -> None:
  """Runs ``write(out)`` (a command's writer into folder ``out``) and prints the paths it returns.

  Raises:
    UserError: a file could not be written; the message names ``--out``.
  """
  try:
    paths = write(out)
  except OSError as e:
    raise UserError(f"cannot write to --out={out}: {e.strerror or e}") from e
  print("wrote:\n  " + "\n  ".join(paths))


def exits_on_user_error(*error_types: type[Exception]) -> Callable:
  """Decorates a command's ``main(argv)``: a :class:`UserError`, a usage error or one of ``error_types`` exits 2.

  The error is printed as ``error: <message>`` on stderr, nothing else.

  Example::

    @cli.exits_on_user_error(compare.CompareError)
    def main(argv): ...
  """
  caught = (UserError, app.UsageError, *error_types)

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
