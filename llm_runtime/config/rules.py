"""Range markers for ``Annotated`` config keys, and the pure checks of one value against its key."""
from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Any

__all__ = ["Range", "allowed", "base_type", "between", "choices", "ge", "gt", "not_zero", "problem"]


@dataclass(frozen=True)
class Range:
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    """True: the value must be strictly above ``low``."""
    zero: bool = True
    """False: 0 is refused even inside the range (``-1`` = infer, 0 is meaningless)."""

    def contains(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and value > self.high:
            return False
        return self.zero or value != 0

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            text = f"from {self.low:g} to {self.high:g}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            text = f"<= {self.high:g}"
        else:
            text = ""
        return text if self.zero else f"{text}, not 0".lstrip(", ")


def ge(low: float) -> Range:
    return Range(low=low)


def gt(low: float) -> Range:
    return Range(low=low, low_open=True)


def between(low: float, high: float) -> Range:
    return Range(low=low, high=high)


not_zero = Range(zero=False)


def _parts(hint: Any) -> tuple[Any, list[Range]]:
    if typing.get_origin(hint) is typing.Annotated:
        base, *extras = typing.get_args(hint)
        return base, [extra for extra in extras if isinstance(extra, Range)]
    return hint, []


def choices(hint: Any) -> tuple | None:
    """A ``Literal`` key's allowed values, else None."""
    base, _ = _parts(hint)
    return typing.get_args(base) if typing.get_origin(base) is typing.Literal else None


def base_type(hint: Any) -> type:
    """``int`` for ``Annotated[int, ...]``, ``str`` for a ``Literal`` of strings."""
    base, _ = _parts(hint)
    options = choices(hint)
    return type(options[0]) if options else base


def allowed(hint: Any) -> str:
    """What a key accepts, in words (for error messages)."""
    options = choices(hint)
    if options:
        return "one of " + ", ".join(map(repr, options))
    kind = base_type(hint)
    words = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}[kind]
    ranges = _parts(hint)[1]
    return " ".join([words, ", ".join(r.describe() for r in ranges)]).strip()


def problem(value: Any, hint: Any) -> bool:
    """True when an already-typed ``value`` is outside what ``hint`` allows."""
    kind, options = base_type(hint), choices(hint)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        return True
    if options is not None and value not in options:
        return True
    if kind is float and not math.isfinite(value):
        return True  # NaN passes every comparison; an infinite timeout overflows timedelta
    return any(not r.contains(value) for r in _parts(hint)[1])
