"""Reading user-named files safely: regular files only, with a size limit.

Config, prompt and image paths come from users and from data files users did not write. A
FIFO would block `open()` forever, `/dev/zero` or a sparse 10 GB file would be read whole
until the process dies. So every such read opens the path without blocking, checks on the
open descriptor (no race with a swapped path) that it is a regular file no larger than the
limit, and never reads more than the limit even when the file grows or lies about its size.

Limits (bytes) can be raised with environment variables, for the rare legitimate giant:
UNIOPD_MAX_CONFIG_BYTES, UNIOPD_MAX_DATA_BYTES, UNIOPD_MAX_IMAGE_BYTES.
"""

from __future__ import annotations

import os
import stat
from typing import IO

__all__ = ["FileRefused", "is_regular", "limit", "open_regular", "read_regular"]

_DEFAULTS = {
    "config": 4 << 20,  # a recipe is a few KB; 4 MB leaves room for inlined lists
    "data": 4 << 30,  # prompt sets are streamed, but a bound stops /dev/zero-like inputs
    "image": 64 << 20,  # far above any real training image
}


class FileRefused(ValueError):
    """A path that is not a regular file, or is over its size limit; the message names it."""


def limit(kind: str) -> int:
    """The size limit in bytes for `kind` ('config', 'data', 'image'), env-overridable."""
    env = _env(kind)
    raw = os.environ.get(env)
    if raw:
        try:
            value = int(float(raw))
        except ValueError:
            raise FileRefused(f"{env}={raw!r}: expected a number of bytes") from None
        if value > 0:
            return value
    return _DEFAULTS[kind]


def describe_mode(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _human(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def _env(kind: str) -> str:
    return f"UNIOPD_MAX_{kind.upper()}_BYTES"


def _over(what: str, path: object, size: str, kind: str) -> FileRefused:
    return FileRefused(f"{what} {path}: {size}, over the {_human(limit(kind))} limit for {kind} files "
                       f"(raise it with {_env(kind)} if this file is meant)")


def open_regular(path: str | os.PathLike[str], *, what: str, kind: str) -> IO[bytes]:
    """Open `path` for binary reading if it is a regular file within the `kind` size limit.

    `what` names the path in errors ("config file", "prompt file", "image", ...).
    Raises FileNotFoundError, FileRefused (a ValueError) or OSError (permission, ...).
    """
    max_bytes = limit(kind)
    # O_NONBLOCK: opening a FIFO with no writer returns at once instead of blocking.
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise FileRefused(f"{what} {path}: is a directory, not a file") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileRefused(f"{what} {path}: is {describe_mode(st.st_mode)}; only regular files are read")
        if st.st_size > max_bytes:
            raise _over(what, path, _human(st.st_size), kind)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike[str], *, what: str, kind: str) -> bytes:
    """The bytes of `path` (see `open_regular`), never more than the limit read."""
    max_bytes = limit(kind)
    with open_regular(path, what=what, kind=kind) as fh:
        data = fh.read(max_bytes + 1)  # a file that grew (or /proc-style size 0) is still bounded
    if len(data) > max_bytes:
        raise _over(what, path, "more bytes than its size said", kind)
    return data


def is_regular(path: str | os.PathLike[str]) -> bool:
    """True for an existing regular file (following links); never blocks."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False
