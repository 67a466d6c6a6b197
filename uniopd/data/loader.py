"""Loading prompt records from files and `datasets`, and writing them back.

Sources (picked by the path):

    *.jsonl, *.ndjson (optionally .gz)  one object per line; blank lines skipped;
                                        locations "train.jsonl:12" (1-based line)
    *.json (optionally .gz)             a list of objects; locations "train.json item 3"
    *.parquet, *.pq                     one record per row; locations "train.parquet row 3"
    a directory                         a `datasets` dataset saved with `save_to_disk`;
                                        locations "<dir> row 3"
    "hf:<name>[:<split>]"               `datasets.load_dataset(name, split=split or "train")`
                                        (only works where the dataset is cached offline)

Generated ids (`generate_ids=True`, only for records without an id) are
"<file stem>-<N>" where N is the number in the record's location: the 1-based line
for JSONL, the 0-based item / row index otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import logging
import os
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from uniopd.data.images import image_to_data_uri
from uniopd.data.records import PromptRecord
from uniopd.data.validate import PSEUDO_FIELDS, RecordError, check_field_map, record_from_obj
from uniopd.safe_io import FileRefused, limit, open_regular

__all__ = [
    "SkippedRecord",
    "LoadResult",
    "load_records",
    "write_records",
    "iter_jsonl_raw",
    "detect_format",
]

log = logging.getLogger(__name__)

_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
}


@dataclass(frozen=True)
class SkippedRecord:
    """An invalid record left out by `skip_invalid=True`."""

    location: str
    field: str
    message: str

    def __str__(self) -> str:
        if self.field in PSEUDO_FIELDS:
            return f"{self.location}: {self.message}"
        return f"{self.location} field '{self.field}': {self.message}"


@dataclass
class LoadResult:
    records: list[PromptRecord]
    skipped: list[SkippedRecord] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[PromptRecord]:
        return iter(self.records)

    def summary(self, max_shown: int = 3) -> str:
        """E.g. "loaded 98 records from x.jsonl, skipped 2 invalid (x.jsonl:3 field 'prompt': ...)"."""
        n = len(self.records)
        text = f"loaded {n} record{'s' if n != 1 else ''} from {self.source}"
        if self.skipped:
            shown = ", ".join(str(s) for s in self.skipped[:max_shown])
            more = len(self.skipped) - max_shown
            if more > 0:
                shown += f", and {more} more"
            text += f", skipped {len(self.skipped)} invalid ({shown})"
        return text


# ---- reading ------------------------------------------------------------------------


def detect_format(path: str | os.PathLike[str]) -> str:
    """'jsonl', 'json', 'parquet', 'datasets' (a directory) or 'hf' (an "hf:" spec)."""
    text = os.fspath(path)
    if isinstance(path, str) and text.startswith("hf:"):
        return "hf"
    p = Path(text)
    if p.is_dir():
        return "datasets"
    name = p.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    suffix = Path(name).suffix
    if suffix in _FORMATS:
        return _FORMATS[suffix]
    raise ValueError(
        f"unsupported prompt file {text!r}: expected .jsonl, .ndjson, .json (optionally .gz), "
        ".parquet, a saved `datasets` directory, or 'hf:<name>[:<split>]'"
    )


def _stem(path: Path) -> str:
    name = path.name
    if name.lower().endswith(".gz"):
        name = name[:-3]
    return Path(name).stem or name


# One record (one JSONL line) at most; past this a "line" is a runaway (a gzip bomb, a file
# without newlines) that would be held in memory whole. Images inlined as data URIs fit.
MAX_LINE_BYTES = 256 << 20


@contextlib.contextmanager
def _open_binary(path: Path) -> Iterator[IO[bytes]]:
    # Regular files only, within the data size limit: a FIFO would hang, /dev/zero fill memory.
    raw = open_regular(path, what="prompt file", kind="data")
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                yield gz
        else:
            yield raw
    finally:
        raw.close()


def _read_failure(source: str, exc: BaseException) -> ValueError:
    if isinstance(exc, (gzip.BadGzipFile, EOFError, zlib.error)):
        return ValueError(f"{source}: not a valid gzip file ({type(exc).__name__}: {exc})")
    return ValueError(f"{source}: cannot read: {type(exc).__name__}: {exc}")


def _read(f: IO[bytes], source: str, size: int, *, line: bool = False) -> bytes:
    try:
        return f.readline(size) if line else f.read(size)
    except (OSError, EOFError, zlib.error) as e:  # a .gz that is not gzip, a truncated one, an I/O error
        raise _read_failure(source, e) from None


def _lines(f: IO[bytes], source: str) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, the line's bytes, or None for a line over MAX_LINE_BYTES)."""
    lineno = 0
    while raw := _read(f, source, MAX_LINE_BYTES + 1, line=True):
        lineno += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while (rest := _read(f, source, 1 << 20, line=True)) and not rest.endswith(b"\n"):
                pass  # skip the rest of the runaway line without holding it
            yield lineno, None
            continue
        yield lineno, raw


def _parse_json_text(text: str, location: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(location, "<json>", f"invalid JSON: {e}") from None
    except RecursionError:
        raise RecordError(location, "<json>", "invalid JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise RecordError(location, "<json>", f"invalid JSON: {e}") from None


def _iter_jsonl(path: Path, source: str) -> Iterator[tuple[str, int, Any]]:
    """(location, line number, parsed object or RecordError) for each non-blank line."""
    with _open_binary(path) as f:
        for lineno, raw in _lines(f, source):
            location = f"{source}:{lineno}"
            if raw is None:
                yield location, lineno, RecordError(location, "<json>", f"line longer than {MAX_LINE_BYTES} bytes; "
                                                                        f"one record must be smaller")
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield location, lineno, RecordError(location, "<json>", f"invalid UTF-8: {e}")
                continue
            if lineno == 1:
                text = text.lstrip("\ufeff")
            if not text.strip():
                continue
            try:
                yield location, lineno, _parse_json_text(text, location)
            except RecordError as e:
                yield location, lineno, e


def iter_jsonl_raw(path: str | os.PathLike[str]) -> Iterator[tuple[int, Any]]:
    """(1-based line number, parsed JSON value) for each non-blank line; raises
    `RecordError` (field "<json>") at the first line that is not valid JSON."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(errno.ENOENT, "prompt file not found", os.fspath(path))
    for _, lineno, value in _iter_jsonl(p, os.fspath(path)):
        if isinstance(value, RecordError):
            raise value
        yield lineno, value


def _iter_json(path: Path, source: str) -> Iterator[tuple[str, int, Any]]:
    max_bytes = limit("data")
    with _open_binary(path) as f:
        raw = _read(f, source, max_bytes + 1)  # bounded: a .json.gz can expand far past its size
    if len(raw) > max_bytes:
        raise FileRefused(f"prompt file {source}: decompresses to more than {max_bytes} bytes, the limit for data "
                          f"files (UNIOPD_MAX_DATA_BYTES)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise RecordError(source, "<json>", f"invalid UTF-8: {e}") from None
    if not text.strip():
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"{source}:{e.lineno}", "<json>", f"invalid JSON: {e}") from None
    except (RecursionError, ValueError) as e:
        raise RecordError(source, "<json>", f"invalid JSON: {e or 'nested too deeply'}") from None
    if not isinstance(data, list):
        raise ValueError(f"{source}: expected a JSON list of record objects, got {type(data).__name__}")
    for i, obj in enumerate(data):
        yield f"{source} item {i}", i, obj


def _foreign_value(value: Any) -> Any:
    """Columns from parquet / `datasets`: turn image cells into data URIs."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        return value
    if isinstance(value, Image.Image):
        return image_to_data_uri(value)
    if isinstance(value, dict) and set(value) == {"bytes", "path"} and (value["bytes"] or value["path"]):
        try:
            return image_to_data_uri(value)
        except (ValueError, OSError):
            return value
    if isinstance(value, list) and value and all(
        isinstance(v, Image.Image) or (isinstance(v, dict) and set(v) == {"bytes", "path"}) for v in value
    ):
        return [_foreign_value(v) for v in value]
    return value


def _foreign_row(row: Mapping[str, Any], field_map: Mapping[str, str | None] | None) -> dict[str, Any]:
    out = {}
    for key, value in row.items():
        value = _foreign_value(value)
        target = field_map.get(key, key) if field_map else key
        if target == "images" and isinstance(value, str):  # a single-image column
            value = [value]
        out[key] = value
    return out


def _iter_rows(rows: Iterable[Mapping[str, Any]], source: str, field_map) -> Iterator[tuple[str, int, Any]]:
    for i, row in enumerate(rows):
        yield f"{source} row {i}", i, _foreign_row(row, field_map)


def _iter_parquet(path: Path, source: str, field_map) -> Iterator[tuple[str, int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open_regular(path, what="prompt file", kind="data") as fh:
        try:
            pf = pq.ParquetFile(fh)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"cannot read parquet file {source}: {e}") from None
        offset = 0
        for batch in pf.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield f"{source} row {offset}", offset, _foreign_row(row, field_map)
                offset += 1


def _pick_split(dsd: Any, split: str | None, source: str) -> Any:
    names = list(dsd.keys())
    if split is None:
        if len(names) == 1:
            split = names[0]
        elif "train" in names:
            split = "train"
        else:
            raise ValueError(f"{source} has splits {names}; pick one with split=...")
    if split not in names:
        raise ValueError(f"{source} has no split {split!r} (splits: {names})")
    return dsd[split]


def _load_datasets_dir(path: Path, source: str, split: str | None) -> Any:
    import datasets

    if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        raise ValueError(f"{source} is a directory but not a dataset saved with `save_to_disk`")
    ds = datasets.load_from_disk(os.fspath(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = _pick_split(ds, split, source)
    return ds


def _load_hf(spec: str, split: str | None) -> tuple[Any, str]:
    import datasets

    rest = spec[3:]
    name, _, spec_split = rest.partition(":")
    if not name:
        raise ValueError(f"bad dataset spec {spec!r}: expected 'hf:<name>[:<split>]'")
    split = spec_split or split or "train"
    try:
        ds = datasets.load_dataset(name, split=split)
    except FileNotFoundError:
        raise
    except Exception as e:  # network off, unknown dataset, ...
        raise ValueError(f"cannot load {spec!r} with datasets.load_dataset (offline cache only): {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        ds = _pick_split(ds, split, spec)
    return ds, name


def load_records(
    path: str | os.PathLike[str],
    *,
    skip_invalid: bool = False,
    field_map: Mapping[str, str | None] | None = None,
    default_domain: str | None = None,
    generate_ids: bool = False,
    check_images: bool = True,
    allow_extra: bool = False,
    require_target: bool = True,
    split: str | None = None,
) -> LoadResult:
    """Load and validate prompt records.

    skip_invalid:   leave out invalid records, listing each in `result.skipped` (and
                    logging a warning); without it the first invalid record raises
                    `RecordError`. If every record is invalid, ValueError either way.
    field_map:      rename columns of foreign datasets, {"question": "prompt",
                    "solution": "answer"}; a None target drops the column, and
                    "meta.<key>" keeps it in meta.
    default_domain: the domain of records that have none.
    generate_ids:   give records without an id "<file stem>-<N>" (see module doc).
    check_images:   verify that every image exists and decodes.
    allow_extra:    keep unknown top-level fields in meta instead of failing.
    require_target: each record needs `answer` or `tests`.
    split:          the split of a saved DatasetDict (default: its only split, or "train").

    Raises FileNotFoundError (no such file), RecordError (invalid record, or malformed
    JSON), ValueError (empty source, unsupported format, all records invalid).
    """
    fmap = check_field_map(field_map) if field_map else None
    if default_domain is not None and (not isinstance(default_domain, str) or not default_domain.strip()):
        raise ValueError(f"default_domain must be a non-empty string, got {default_domain!r}")

    source = os.fspath(path)
    is_hf = isinstance(path, str) and path.startswith("hf:")
    if not is_hf and not Path(source).exists():
        raise FileNotFoundError(errno.ENOENT, "prompt file not found", source)
    fmt = detect_format(path)
    base_dir: Path | None
    rows: Iterator[tuple[str, int, Any]]
    if fmt == "hf":
        ds, name = _load_hf(source, split)
        stem = name.rstrip("/").split("/")[-1]
        base_dir = None
        rows = _iter_rows(ds, source, fmap)
    else:
        p = Path(source)
        stem = _stem(p) if fmt != "datasets" else (p.absolute().name or "dataset")
        base_dir = p.absolute().parent
        if fmt == "jsonl":
            rows = _iter_jsonl(p, source)
        elif fmt == "json":
            rows = _iter_json(p, source)
        elif fmt == "parquet":
            rows = _iter_parquet(p, source, fmap)
        else:
            rows = _iter_rows(_load_datasets_dir(p, source, split), source, fmap)

    records: list[PromptRecord] = []
    skipped: list[SkippedRecord] = []
    first_seen: dict[str, str] = {}
    for location, number, obj in rows:
        try:
            if isinstance(obj, RecordError):
                raise obj
            record = record_from_obj(
                obj,
                location=location,
                base_dir=base_dir,
                allow_extra=allow_extra,
                require_target=require_target,
                check_images=check_images,
                field_map=fmap,
                default_domain=default_domain,
                default_id=f"{stem}-{number}" if generate_ids else None,
            )
            if record.id in first_seen:
                raise RecordError(location, "id", f"duplicate id {record.id!r} (first at {first_seen[record.id]})")
            first_seen[record.id] = location
            records.append(record)
        except RecordError as e:
            if not skip_invalid:
                raise
            skipped.append(SkippedRecord(e.location, e.field, e.message))

    if not records and not skipped:
        raise ValueError(f"no records in {source}")
    if not records:
        raise ValueError(f"no valid records in {source}: all {len(skipped)} invalid; first: {skipped[0]}")
    if skipped:
        log.warning("skipped %d invalid record(s) in %s; first: %s", len(skipped), source, skipped[0])
    return LoadResult(records=records, skipped=skipped, source=source)


# ---- writing ------------------------------------------------------------------------


def write_records(path: str | os.PathLike[str], records: Iterable[PromptRecord | Mapping[str, Any]]) -> Path:
    """Write records as JSONL (gzip if the name ends in .gz), atomically: a temporary
    file in the same directory is filled, flushed, then renamed over `path`.

    Image paths are written as they are in the records (absolute after `load_records`).
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        os.chmod(tmp, out.stat().st_mode & 0o777 if out.exists() else 0o644)
        with os.fdopen(fd, "wb") as raw:
            stream: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="wb") if out.name.lower().endswith(".gz") else raw
            for rec in records:
                obj = rec.to_json() if isinstance(rec, PromptRecord) else dict(rec)
                stream.write(json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n")
            if stream is not raw:
                stream.close()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return out
