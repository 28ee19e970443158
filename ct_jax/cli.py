"""Argument wiring shared by the commands (ct_jax.commands, scripts/*.py): config dataclasses as flags.

Each field of a config dataclass becomes one flag, its help text read from the field's
metadata (`ct_jax.config.documented`), so a setting is described once, beside its field.
No JAX import here: flags are parsed before JAX starts.
"""

from __future__ import annotations

import argparse
import collections.abc
import contextlib
import dataclasses
import enum
import functools
import os
import sys
import traceback
import types
import typing
from collections.abc import Callable
from typing import Any

INTERRUPTED = 130  # the shell's status for a process ended by SIGINT (128 + 2)


def flag(name: str) -> str:
    """The flag of a field: `n_segments` -> `--n-segments`."""
    return "--" + name.replace("_", "-")


def int_list(text: str) -> list[int]:
    """A comma-separated list of ints ('' for none), as flags of tuple fields take them."""
    return [int(value) for value in text.split(",") if value]


def _base_type(hint: Any) -> Any:
    """The type a flag parses: the first non-None member of a union (`Compression | str` -> Compression)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def _is_sequence(kind: Any) -> bool:
    """Whether a field holds several ints (`memory_layers: Iterable[int] | None`)."""
    return (typing.get_origin(kind) or kind) in (tuple, list, collections.abc.Iterable, collections.abc.Sequence)


def add_dataclass_flags(group: Any, cls: type, defaults: dict[str, Any],
                        choices: dict[str, list[str]] | None = None) -> None:
    """One flag per field of `cls` (into a parser or an argument group): bools get --x / --no-x, sequences of
    ints a comma-separated list, enums their values as choices; `defaults` and `choices` override the field's."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        name = field.name
        default = defaults.get(name, None if field.default is dataclasses.MISSING else field.default)
        default = default.value if isinstance(default, enum.Enum) else default  # flags hold plain strings
        base = _base_type(hints[name])
        described = field.metadata.get("help")
        help_text = f"{described}; default: {default}" if described else f"default: {default}"
        if base is bool:
            group.add_argument(flag(name), action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif _is_sequence(base):
            group.add_argument(flag(name), type=int_list, default=default, metavar="I,J,...", help=help_text)
        elif choices is not None and name in choices:
            group.add_argument(flag(name), choices=choices[name], default=default, help=help_text)
        elif isinstance(base, type) and issubclass(base, enum.Enum):
            group.add_argument(flag(name), choices=[member.value for member in base], default=default, help=help_text)
        else:
            parse = base if base in (int, float, str) else str
            group.add_argument(flag(name), type=parse, default=default, help=help_text)


def field_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The values of `cls`'s fields among parsed `args` (flags added by `add_dataclass_flags`)."""
    return {field.name: getattr(args, field.name) for field in dataclasses.fields(cls)}


class UsageError(SystemExit):
    """A flag argparse refuses: a SystemExit with status 2, as argparse's own, whose message `command` prints."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors raise UsageError, which `command` prints as one line (exit status 2)
    instead of argparse's usage block."""

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser whose description is a command's docstring, printed as written (its usage examples), with --debug."""
    made = Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    made.add_argument("--debug", action="store_true", help="on an error, print the full traceback (default: one line)")
    return made


def exit_status(error: BaseException) -> int:
    """The exit status of a command ended by `error`: 2 for bad input (ValueError, TypeError, a missing file; a
    bad flag is a UsageError), 130 for Ctrl-C, 1 for anything else."""
    if isinstance(error, KeyboardInterrupt):
        return INTERRUPTED
    return 2 if isinstance(error, (ValueError, TypeError, FileNotFoundError)) else 1


def one_line(error: BaseException) -> str:
    """`error` as one line: its message, whitespace collapsed; the type named (and --debug offered) unless it is
    a ValueError, TypeError, OSError or an error class of ct_jax, whose messages name what went wrong."""
    message = " ".join(str(error).split())
    ours = isinstance(error, (ValueError, TypeError, OSError)) or type(error).__module__.startswith("ct_jax.")
    if not message or not ours:
        message = f"{type(error).__name__}: {message}".rstrip(": ") + " (--debug prints the traceback)"
    return message


def _wants_debug(argv: list[str] | None) -> bool:
    return "--debug" in (sys.argv[1:] if argv is None else argv)


def command(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Wraps a command's `main(argv)`: any error becomes one line `error: ...` on stderr and an exit status
    (`exit_status`); `--debug` prints the traceback instead of the line.

    Called with `argv=None` (a console script or scripts/NAME.py: the process is the command), an error ends
    the process at once after flushing (`os._exit`), so that threads left running (an orbax or tensorstore
    worker) cannot keep it alive; called with a list (tests, other Python code), it returns the status.
    """

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except UsageError as error:
            code = error.code
            print(f"error: {error}", file=sys.stderr)
        except (Exception, KeyboardInterrupt) as error:  # other SystemExits (--help, a status) pass
            code = exit_status(error)
            if isinstance(error, KeyboardInterrupt):
                print("interrupted (Ctrl-C)", file=sys.stderr)
            elif _wants_debug(argv):
                traceback.print_exc()
            else:
                print(f"error: {one_line(error)}", file=sys.stderr)
        if argv is None:
            with contextlib.suppress(OSError, ValueError):  # a closed pipe must not stop the exit
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
        return code

    return wrapped
