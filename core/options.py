"""Options declared once: each field of an options dataclass says how a user sets it.

``option()`` is a dataclass field whose metadata holds the help text and how to read the value
from text (a parser that raises :class:`OptionError`). The CLI builds its arguments, defaults and
``--help`` from these fields and builds the dataclass back from what was parsed, so an option's
name, default and rule live in one place, beside the code that uses it. A plain ``field`` (or
default) stays out of the CLI.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from penult.core.errors import OptionError

__all__ = [
    "COUNT",
    "DEFAULT_MAX_PIXELS",
    "CROP",
    "FRACTION",
    "POSITIVE",
    "RATE",
    "Flag",
    "cli_fields",
    "option",
    "ranged",
    "parse_shard",
]

# Above this many pixels an image is treated as a decompression bomb (Pillow's own hard limit).
# Both stages apply it: extract before decoding, serve before making a thumbnail.
DEFAULT_MAX_PIXELS = 2 * 89_478_485


@dataclass(frozen=True)
class Flag:
    """How one dataclass field appears on the command line."""

    help: str
    flags: tuple[str, ...] = ()  # default: --field-name
    parse: Callable[[str], Any] | None = None  # text -> value; raises OptionError
    choices: tuple[Any, ...] | None = None
    metavar: str | None = None
    repeat: bool = False  # given several times; the values form a tuple


def option(
    default: Any,
    help: str,  # noqa: A002 - argparse's word for it
    *,
    flags: tuple[str, ...] | str = (),
    parse: Callable[[str], Any] | None = None,
    choices: tuple[Any, ...] | None = None,
    metavar: str | None = None,
    repeat: bool = False,
) -> Any:
    """A dataclass field the command line can set. A bool that defaults to True is switched
    off by its flag (name it so: ``--no-augment``, ``--quiet``)."""
    flags = (flags,) if isinstance(flags, str) else tuple(flags)
    spec = Flag(help, flags, parse, tuple(choices) if choices else None, metavar, repeat)
    return dataclasses.field(default=default, metadata={"cli": spec})


def cli_fields(cls: type) -> list[tuple[dataclasses.Field, Flag]]:
    """The fields of options dataclass ``cls`` that the command line sets: its own in declaration
    order, then those it inherits (shared groups such as RuntimeOptions), each with the choices
    or help the class narrows in its ``narrowed`` mapping."""
    own = set(vars(cls).get("__annotations__", {}))
    narrowed = getattr(cls, "narrowed", {})
    out = [
        (f, dataclasses.replace(f.metadata["cli"], **narrowed.get(f.name, {})))
        for f in dataclasses.fields(cls)
        if "cli" in f.metadata
    ]
    return sorted(out, key=lambda fs: fs[0].name not in own)  # (stable: each part in order)


def ranged(
    cast: type,
    lo: float | None = None,
    hi: float | None = None,
    *,
    open_lo: bool = False,
    open_hi: bool = False,
) -> Callable[[str], Any]:
    """A parser: ``cast`` the text and refuse NaN, inf and values outside [lo, hi]."""
    lo_s = "" if lo is None else ("> " if open_lo else ">= ") + f"{lo:g}"
    hi_s = "" if hi is None else ("< " if open_hi else "<= ") + f"{hi:g}"
    want = " and ".join(x for x in (lo_s, hi_s) if x)

    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            kind = "an integer" if cast is int else "a number"
            raise OptionError(f"{text!r} is not {kind}") from None
        bad = isinstance(v, float) and not math.isfinite(v)
        bad |= lo is not None and (v < lo or (open_lo and v == lo))
        bad |= hi is not None and (v > hi or (open_hi and v == hi))
        if bad:
            raise OptionError(f"{text!r}: must be {want or 'a finite number'}")
        return v

    parse.__name__ = cast.__name__  # argparse names the type in its messages
    return parse


POSITIVE = ranged(int, 1)
COUNT = ranged(int, 0)
FRACTION = ranged(float, 0, 1, open_lo=True, open_hi=True)  # strictly between 0 and 1
CROP = ranged(float, 0, 1, open_lo=True)
RATE = ranged(float, 0)


def parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` with 0 <= I < N."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise OptionError(f"{text!r} is not I/N (e.g. 0/4)") from None
    if not 0 <= i < n:
        raise OptionError(f"{text!r}: need 0 <= I < N")
    return i, n
