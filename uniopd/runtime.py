"""Process-wide setup, done once per process before any model loads: torch threads, seeds,
the device, and the CPU allocator setting. Checkpoints save and restore the RNG states here.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from uniopd.config import TrainerConfig


def setup_process(cfg: TrainerConfig) -> torch.device:
    """Threads, seeds, device and (CPU) allocator for a run; returns the device."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    if device.type == "cpu" and cfg.reuse_cpu_memory:
        reuse_freed_cpu_memory()
    return device


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
