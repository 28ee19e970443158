"""Argument wiring shared by the commands (ct_jax.commands, scripts/*.py): config dataclasses as flags.

Each field of a config dataclass becomes one flag, its help text read from the field's
metadata (`ct_jax.config.documented`), so a setting is described once, beside its field.
No JAX import here: flags are parsed before JAX starts.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import enum
import sys
import types
import typing
from typing import Any


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


def parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser whose description is a command's docstring, printed as written (its usage examples)."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def refuse(error: BaseException, code: int = 2) -> int:
    """Prints `error` as one line on stderr (no traceback: the message names the bad input) and returns `code`."""
    print(f"error: {error}", file=sys.stderr)
    return code
