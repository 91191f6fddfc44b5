"""Options checked against their declared types and ranges, with one-line errors that name the fix
(the command-line appendix shows them).

A config dataclass declares each field's type, and its range where one applies, in its annotation,
and calls `check_fields(self)` first thing in `__post_init__`::

    @dataclass
    class Example:
        batch_size: Annotated[int, Positive] = 16
        lr: Annotated[float, Positive] = 2e-3
        precision: Annotated[str, OneOf("auto", "fp32", "bf16")] = "auto"
        inner: UNetConfig = field(default_factory=UNetConfig)  # a dict (from JSON) is built into one

    Example(batch_size="2")  # ConfigError: batch_size must be a positive integer, got '2' (a string)

Rules, the same from Python, JSON and the command line: an int is an int (not a bool, not 2.0, not
"2"); a float is a finite number, and an int given for it becomes a float; a tuple field takes a
list or a tuple and stores a tuple; a dataclass field takes an instance or a dict of its fields,
checked the same way, and an error inside it names the path (model.inner.channels); `X | None`
also takes None. `check_value` applies the same rules to one value (a function's argument),
`check_options` to keyword options given as text (--dataset_option key=value).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import sys
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Callable


class ConfigError(ValueError):
    """An option that cannot work; the message names it, its value and the fix.

    field: the option's path (model.inner.channels), or None when the message names it itself.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(f"{field} {message}" if field else message)
        self.field, self.problem = field, message

    def within(self, prefix: str) -> ConfigError:
        """The same error for a config nested at `prefix` (model, then model.inner, ...)."""
        return ConfigError(self.problem, f"{prefix}.{self.field}") if self.field else self


@dataclass(frozen=True)
class Range:
    """low <= value <= high (either bound may be None); low_open / high_open exclude the bound.
    hint: what to say after the rule, e.g. "0 keeps every checkpoint"."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    hint: str = ""

    def holds(self, value) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self, integer: bool) -> str:
        kind = "integer" if integer else "number"
        if (self.low, self.low_open, self.high) == (0, True, None):
            return f"a positive {kind}"
        if (self.low, self.low_open, self.high) == (0, False, None):
            return f"{'an integer' if integer else 'a number'} >= 0"
        if self.high is None:
            return f"{'an integer' if integer else 'a number'} {'>' if self.low_open else '>='} {self.low}"
        if self.low is None:
            return f"{'an integer' if integer else 'a number'} {'<' if self.high_open else '<='} {self.high}"
        return (f"{'an integer' if integer else 'a number'} in {'(' if self.low_open else '['}{self.low}, "
                f"{self.high}{')' if self.high_open else ']'}")


@dataclass(frozen=True)
class OneOf:
    """The value is one of `values`."""

    values: tuple
    hint: str = ""

    def __init__(self, *values, hint: str = ""):
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "hint", hint)

    def holds(self, value) -> bool:
        return value in self.values

    def describe(self, integer: bool) -> str:
        return "one of " + ", ".join(str(v) for v in self.values)


@dataclass(frozen=True)
class Rule:
    """Any other condition: `test(value)`, described as `rule` ("even", "non-empty", ...)."""

    test: Callable[[Any], bool]
    rule: str
    hint: str = ""

    def holds(self, value) -> bool:
        return bool(self.test(value))

    def describe(self, integer: bool) -> str:
        return self.rule


Positive = Range(0, low_open=True)
NonNegative = Range(0)
NonEmpty = Rule(len, "non-empty")


def _is_device(text: str) -> bool:
    kind, _, index = text.partition(":")
    return text in ("auto", "cpu", "cuda") or kind == "cuda" and index.isdigit()


Device = Rule(_is_device, "auto, cpu, cuda or cuda:N")
Seed = Range(0, 2 ** 63 - 1)


def _shown(value) -> str:
    """A value as an error message shows it: its repr, cut at 60 characters, and its JSON kind
    where the repr alone could mislead ('2' is a string, not a number)."""
    text = repr(list(value) if isinstance(value, tuple) else value)  # as JSON and the CLI write it
    text = text if len(text) <= 60 else text[:57] + "..."
    kind = {str: "a string", list: "a list", tuple: "a list", dict: "an object"}.get(type(value))
    return f"{text} ({kind})" if kind else text


def _type_name(kind) -> str:
    """How a type reads in an error message: "an integer", "a list of integers", ..."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0]).split(' ', 1)[1]}s"
        return f"a list of {len(args)} {_type_name(args[0]).split(' ', 1)[1]}s"
    if origin is list:
        return f"a list of {_type_name(args[0]).split(' ', 1)[1]}s"
    if dataclasses.is_dataclass(kind):
        return f"an object of {kind.__name__} fields"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "an object",
            type(None): "null"}.get(kind, f"a {getattr(kind, '__name__', kind)}")


def check_value(name: str, value, kind):
    """`value` checked against the type annotation `kind`; returns it, converted where the rules
    say (list -> tuple, int -> float, dict -> dataclass). Raises ConfigError naming `name`."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Annotated:
        value = check_value(name, value, args[0])
        integer = isinstance(value, int)
        for constraint in args[1:]:
            if not constraint.holds(value):
                hint = f"; {constraint.hint}" if constraint.hint else ""
                raise ConfigError(f"must be {constraint.describe(integer)}, got {_shown(value)}{hint}", name)
        return value
    if origin in (typing.Union, types.UnionType):  # X | None: None means unset
        if value is None:
            return None
        (option,) = (a for a in args if a is not type(None))
        return check_value(name, value, option)
    if dataclasses.is_dataclass(kind):
        return value if isinstance(value, kind) else build(kind, value, name)
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"must be {_type_name(kind)}, got {_shown(value)}", name)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis) and len(value) != len(args):
            raise ConfigError(f"must be {_type_name(kind)}, got {_shown(value)}", name)
        kinds = [args[0]] * len(value) if origin is list or args[1:] == (Ellipsis,) else args
        items = [check_value(f"{name}[{i}]", v, k) for i, (v, k) in enumerate(zip(value, kinds))]
        return tuple(items) if origin is tuple else items
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"must be a number, got {_shown(value)}", name)
        if abs(value) > sys.float_info.max or not math.isfinite(value):  # an int can be too large for a float
            raise ConfigError(f"must be a finite number, got {_shown(value)}", name)
        return float(value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"must be an integer, got {_shown(value)}", name)
        return value
    if kind is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"must be an object of named options, got {_shown(value)}", name)
        return value
    if kind in (str, bool) and not isinstance(value, kind):
        raise ConfigError(f"must be {_type_name(kind)}, got {_shown(value)}", name)
    return value


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def check_fields(config) -> None:
    """Check every field of the dataclass instance `config` against its annotation, in place
    (converting as `check_value` does). Raises ConfigError naming the field."""
    hints = _hints(type(config))
    for f in dataclasses.fields(config):
        setattr(config, f.name, check_value(f.name, getattr(config, f.name), hints[f.name]))


def _unknown(names, known, where: str) -> ConfigError:
    name = sorted(names)[0]
    close = difflib.get_close_matches(name, known, n=1)
    fix = f"did you mean {close[0]}?" if close else f"known: {', '.join(known)}"
    return ConfigError(f"has no option {name!r} ({fix}); rename or remove it", where)


def build(cls, data, path: str | None = None):
    """``cls(**data)`` for a dataclass `cls` and a dict `data` (e.g. from JSON), with every error a
    ConfigError naming its path under `path`."""
    where = path or f"a {cls.__name__}"
    if not isinstance(data, dict):
        raise ConfigError(f"must be {_type_name(cls)}, got {_shown(data)}", where)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    if set(data) - set(known):
        raise _unknown(set(data) - set(known), known, where)
    try:
        return cls(**data)
    except ConfigError as error:
        raise error.within(path) if path else error from None
    except ValueError as error:  # a dataclass of another module that checks itself with ValueError
        raise ConfigError(f"{error}", where) from None


def check_options(options: dict, hints: dict[str, Any], where: str) -> dict:
    """Keyword options (e.g. --dataset_option key=value) checked against `hints`, {name: type}:
    unknown names and values of the wrong type are ConfigErrors naming `where`. Returns them converted."""
    if set(options) - set(hints):
        raise _unknown(set(options) - set(hints), list(hints), where)
    return {name: check_value(f"{where} {name}", value, hints[name]) for name, value in options.items()}
