"""Image references in prompt records: local paths and base64 data URIs.

An image reference is a string, one of:

    "img/cat.png"                     a path, relative to the data file's directory
    "/data/img/cat.png"               an absolute path
    "file:///data/img/cat.png"        a file URL (same as the absolute path)
    "data:image/png;base64,iVBOR..."  a base64 data URI

Remote URLs (http, https, ...) are refused: nothing here goes to the network, so
download them first. `check_image` accepts exactly what `load_image` can load.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
from pathlib import Path
from typing import Any

from PIL import Image

from uniopd.safe_io import FileRefused, limit, read_regular

__all__ = [
    "is_data_uri",
    "is_remote_url",
    "resolve_image_path",
    "decode_data_uri",
    "image_bytes",
    "check_image",
    "load_image",
    "image_to_data_uri",
    "short_ref",
]

_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*),", re.DOTALL)
_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]+)://")


def short_ref(ref: str, limit: int = 60) -> str:
    """The reference cut to `limit` characters, for error messages (data URIs are long)."""
    return ref if len(ref) <= limit else ref[: limit - 3] + "..."


def is_data_uri(ref: str) -> bool:
    return ref[:5].lower() == "data:"


def is_remote_url(ref: str) -> bool:
    """True for scheme://... references other than file:// (http, https, s3, gs, ...)."""
    m = _SCHEME.match(ref)
    return bool(m) and m.group("scheme").lower() != "file"


def resolve_image_path(ref: str, base_dir: str | os.PathLike[str] | None = None) -> Path:
    """The local path of a path or file:// reference; relative paths join `base_dir`
    (the current directory when None)."""
    if ref[:7].lower() == "file://":
        ref = ref[7:]
    path = Path(ref).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return path


def decode_data_uri(ref: str) -> bytes:
    """The bytes of a base64 data URI; ValueError if it is not one."""
    m = _DATA_URI.match(ref)
    if not m:
        raise ValueError("malformed data URI (expected 'data:image/<type>;base64,<data>')")
    params = [p.strip().lower() for p in m.group("params").split(";") if p.strip()]
    if "base64" not in params:
        raise ValueError("only base64 data URIs are supported (missing ';base64')")
    payload = "".join(ref[m.end() :].split())  # tolerate line-wrapped base64
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"invalid base64 in data URI: {e}") from None
    if not data:
        raise ValueError("empty data URI")
    if len(data) > limit("image"):
        raise ValueError(f"data URI holds {len(data)} bytes, over the {limit('image')} byte limit for images "
                         f"(UNIOPD_MAX_IMAGE_BYTES)")
    return data


def image_bytes(ref: str, base_dir: str | os.PathLike[str] | None = None) -> bytes:
    """The raw (encoded) bytes behind a reference; ValueError / FileNotFoundError if unusable."""
    if not isinstance(ref, str) or not ref.strip():
        raise ValueError("image reference must be a non-empty string")
    if is_data_uri(ref):
        return decode_data_uri(ref)
    if is_remote_url(ref):
        raise ValueError("remote image URLs are not fetched; download the image and use its path")
    path = resolve_image_path(ref, base_dir)
    return _read_image_file(path)


def _read_image_file(path: Path) -> bytes:
    # Regular files only, size-limited: a FIFO would hang the loader, /dev/zero fill memory.
    try:
        return read_regular(path, what="image", kind="image")
    except FileRefused:  # not a regular file, or over the limit: the message names the path
        raise
    except FileNotFoundError:
        raise FileNotFoundError(f"file not found: {path}") from None
    except (OSError, ValueError) as e:  # permission, name too long, embedded NUL, ...
        raise ValueError(f"cannot read {path}: {e}") from None


def check_image(ref: str, base_dir: str | os.PathLike[str] | None = None) -> None:
    """Raise ValueError (or FileNotFoundError) unless `ref` names a readable image.

    Uses PIL's `verify()`: it reads the header and checks the file's structure
    (chunk checksums for PNG) without decoding every pixel.
    """
    data = image_bytes(ref, base_dir)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, SyntaxError, ...)
        raise ValueError(f"not a readable image: {type(e).__name__}: {e}") from None


def load_image(ref: Any, base_dir: str | os.PathLike[str] | None = None) -> Image.Image:
    """Load an image reference (path, file:// URL, data URI, or a PIL image) as RGB."""
    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    data = image_bytes(ref, base_dir)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except Exception as e:
        raise ValueError(f"cannot decode image {short_ref(ref)!r}: {type(e).__name__}: {e}") from None


def image_to_data_uri(image: Any, format: str = "PNG") -> str:
    """A base64 data URI for a PIL image, raw encoded bytes, or a Hugging Face
    `datasets` image cell ({"bytes": ..., "path": ...})."""
    if isinstance(image, dict):
        if image.get("bytes"):
            image = image["bytes"]
        elif image.get("path"):
            image = _read_image_file(Path(image["path"]))
        else:
            raise ValueError("image dict has neither 'bytes' nor 'path'")
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        try:
            with Image.open(io.BytesIO(data)) as img:
                mime = Image.MIME.get(img.format or "", "image/png")
        except Exception as e:
            raise ValueError(f"not a readable image: {type(e).__name__}: {e}") from None
        return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        img = image if format.upper() != "JPEG" else image.convert("RGB")
        img.save(buf, format=format)
        mime = Image.MIME.get(format.upper(), f"image/{format.lower()}")
        return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    raise TypeError(f"cannot make a data URI from {type(image).__name__}")
