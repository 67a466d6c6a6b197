"""The pieces every config dataclass is made of: the error type, fields with help texts,
and the checks that name the dotted key. A leaf module, so modules the config imports can
raise `ConfigError` too."""

from __future__ import annotations

import dataclasses
import reprlib
from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the dotted key."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda: dataclasses.replace(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


# Error messages show values through this: a value can be huge (a pasted file, an expanded
# YAML alias graph), and a full repr of it can take longer and more memory than the run.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 80, 80, 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6


def _short(value: Any) -> str:
    return _REPR.repr(value)


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {_short(value)} is not one of {', '.join(map(repr, choices))}")


_MAX_THREADS = 4096  # torch.set_num_threads overflows far below the int64 bound on ints


def _check_range(key: str, value: float, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False) -> None:
    if value != value:  # NaN passes every comparison below
        raise ConfigError(f"{key}: NaN is not allowed")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ConfigError(f"{key}: {value!r} must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}: {value!r} must be <= {hi}")
