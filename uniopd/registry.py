"""Name-keyed registries for the parts users choose by name: rollout engines, teacher scorers.

A built-in entry is a dotted path `package.module:Attr`, imported only when chosen, so a
backend's heavy dependencies load only in runs that use it. A user's own class is chosen the
same way, by writing its dotted path where a name would go (`rollout.backend:
mypkg.engines:MyEngine`): a backend is one file plus one registry line, or no line at all.
"""

from __future__ import annotations

import importlib
from typing import Any

from uniopd.config import ConfigError


def is_dotted_path(name: str) -> bool:
    module, sep, attr = name.partition(":")
    return bool(sep and module and attr)


def resolve(key: str, name: str, builtins: dict[str, str], base: type | None = None) -> Any:
    """The object registered as `name` (or at the dotted path `name`); `key` is the config
    key that chose it, named in every error. With `base`, the object must subclass it."""
    target = builtins.get(name, name)
    if not is_dotted_path(target):
        raise ConfigError(f"{key}: {name!r} is not one of {', '.join(map(repr, builtins))} "
                          f"and not a dotted path 'package.module:Class'")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{key}: cannot import {module_name!r} for {name!r}: {exc}") from None
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{key}: module {module_name!r} has no attribute {attr!r}") from None
    if base is not None and not (isinstance(obj, type) and issubclass(obj, base)):
        raise ConfigError(f"{key}: {target!r} is not a subclass of {base.__module__}.{base.__qualname__}")
    return obj
