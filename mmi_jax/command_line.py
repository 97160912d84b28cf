"""What every command does with its command line.

`--help` (or `-h`) prints the command's usage and its flags and exits 0. A mistake in the
command line or in the config it names ends the command with one line on stderr that names
the mistake, and exit code 2 (`UsageError`). The commands check their settings before the long
work (compiles, fits, training) starts.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

from absl import flags

USAGE_EXIT_CODE = 2
HELP_ARGUMENTS = ("--help", "-h", "--helpshort", "--helpfull")


class UsageError(ValueError):
  """A mistake in a command line or in the settings of its config; the message is what the
  command prints. The config checks of the library raise it too, so that a command stops on
  them with one line."""


def parse(flag_values: flags.FlagValues, argv: Sequence[str], usage: str) -> list[str]:
  """Parses `argv` (`[program, *arguments]`) into `flag_values`; returns the positional
  arguments. Answers `--help` with `usage` and the flags' help (exit 0); raises `UsageError`
  for an unknown flag, a value that does not parse, or a config override that names no
  setting."""
  arguments = list(argv[1:])
  if any(argument in HELP_ARGUMENTS for argument in arguments):
    print(usage.strip())
    print("\nflags:")
    print(flag_values.get_help(include_special_flags=False))
    raise SystemExit(0)
  try:
    return flag_values([argv[0], *arguments])[1:]
  except Exception as error:  # noqa: BLE001 (each kind is named in `_config_mistake`)
    raise _config_mistake(error, arguments) from None


def config_value(flag_values: flags.FlagValues, argv: Sequence[str], name: str = "config"
                 ) -> Any:
  """The config of a `config_flags.DEFINE_config_file` flag, loaded (with its overrides);
  raises `UsageError` when it is missing, the file cannot be loaded or an override names no
  setting."""
  try:
    config = flag_values[name].value
    if config is not None:
      config.keys()  # a file that failed to load fails here, not at the first setting read
  except Exception as error:  # noqa: BLE001
    raise _config_mistake(error, argv, name) from None
  if config is None:
    raise UsageError(f"--{name}=FILE is required (for example --{name}=configs/demo.py)")
  return config


def _config_mistake(error: Exception, argv: Sequence[str], name: str = "config") -> Exception:
  """The `UsageError` for what absl or ml_collections raised on a command line; an error of
  another kind (a bug) is returned as it is."""
  if isinstance(error, flags.Error):
    return UsageError(one_line(str(error)))
  if isinstance(error, (AttributeError, KeyError)):
    # ml_collections names the missing field only: find the override that asks for it.
    message = error
    while isinstance(message, BaseException):  # AttributeError(KeyError("'field'\n..."))
      message = message.args[0] if message.args else ""
    lines = str(message).splitlines() or [""]
    field = lines[0].strip("\"'")
    hint = f" ({lines[1].strip()})" if len(lines) > 1 else ""
    overrides = [argument.split("=")[0] for argument in argv
                 if argument.startswith(f"--{name}.")
                 and field in argument.split("=")[0].split(".")]
    where = overrides[0] if overrides else f"--{name}"
    return UsageError(f"{where}: the config has no setting {field!r}{hint}")
  if isinstance(error, (OSError, ValueError, TypeError)):
    return UsageError(f"--{name}: {one_line(str(error))}")
  return error


def one_line(message: str) -> str:
  """The first and the last line of a multi-line message (a wrapped traceback's cause)."""
  lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
  return lines[0] if len(lines) <= 1 else f"{lines[0]} {lines[-1]}"


def error_summary(error: BaseException, limit: int = 300) -> str:
  """`Type: first line` of a library's exception, at most `limit` characters of it (without
  TensorStore's spec of the array, dozens of lines after " See full"), for a message that
  names what failed."""
  line = (str(error).strip().splitlines() or [""])[0].split(" See full")[0]
  return f"{type(error).__name__}: {line[:limit]}"


def run(main: Callable[[list[str]], None], argv: Sequence[str], program: str) -> None:
  """Runs `main(argv)`; a `UsageError` becomes one line on stderr (`program: error: ...`)
  and exit code 2."""
  try:
    main(list(argv))
  except UsageError as error:
    print(f"{program}: error: {error}", file=sys.stderr)
    raise SystemExit(USAGE_EXIT_CODE) from None


__all__ = ["HELP_ARGUMENTS", "USAGE_EXIT_CODE", "UsageError", "config_value", "error_summary",
           "one_line", "parse", "run"]
