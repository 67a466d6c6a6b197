"""Validation of prompt records: a JSON-like object in, a `PromptRecord` out.

`record_from_obj` checks one object against the schema documented in `records.py` and
`docs/data.md` and raises `RecordError` at the first problem, naming where it is
(`location`, e.g. "data/train.jsonl:12"), which field (`field`, e.g. "answer" or
"prompt[1].content[0].text") and what is wrong (`message`).

Rules that go beyond the type table:
  * `null` in an optional field means "absent" (parquet and `datasets` rows fill
    missing columns with None); a null `id` / `domain` takes the generated id / default
    domain when given, otherwise it is an error.
  * `id`: a non-blank string, or an integer (converted with str()); floats and
    booleans are rejected.
  * `answer`: a non-blank string, or a finite number converted with str() (3 -> "3",
    3.0 -> "3.0", 1e20 -> "1e+20"); booleans are rejected. Write answers as strings
    to keep them verbatim.
  * Relative image paths are resolved against `base_dir` (when given) and stored
    absolute, so a record stays usable after it leaves its file.
"""

from __future__ import annotations

import difflib
import math
import os
from pathlib import Path
from typing import Any, Mapping, NoReturn

from uniopd.data.images import check_image, is_data_uri, is_remote_url, short_ref
from uniopd.data.records import PromptRecord

__all__ = [
    "KNOWN_FIELDS",
    "ROLES",
    "PART_TYPES",
    "PSEUDO_FIELDS",
    "RecordError",
    "record_from_obj",
    "validate_record",
    "check_field_map",
]

KNOWN_FIELDS: tuple[str, ...] = (
    "id",
    "domain",
    "prompt",
    "answer",
    "tests",
    "images",
    "image_text",
    "teacher_prompt",
    "verifier",
    "teacher",
    "meta",
)
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
PART_TYPES: tuple[str, ...] = ("text", "image")
# `RecordError.field` values that are not a field: the line is not JSON / not an object
PSEUDO_FIELDS: frozenset[str] = frozenset({"<json>", "<record>"})


class RecordError(ValueError):
    """One invalid record. `str(err)` is "<location>: field '<field>': <message>".

    Pseudo-fields in angle brackets name problems that are not about one field:
    "<json>" (the line is not valid JSON) and "<record>" (not a JSON object); for
    those, `str(err)` is "<location>: <message>".
    """

    def __init__(self, location: str, field: str, message: str) -> None:
        self.location = location
        self.field = field
        self.message = message
        super().__init__(self._format())

    def _format(self) -> str:
        if self.field in PSEUDO_FIELDS:
            return f"{self.location}: {self.message}"
        return f"{self.location}: field '{self.field}': {self.message}"

    def __str__(self) -> str:
        return self._format()

    def __reduce__(self):  # picklable across processes
        return (type(self), (self.location, self.field, self.message))


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _is_blank(value: str) -> bool:
    return not value.strip()


class _Checker:
    """Holds the location and options while one object is checked."""

    def __init__(self, location: str, base_dir: str | os.PathLike[str] | None, check_images: bool):
        self.location = location
        self.base_dir = base_dir
        self.check_images = check_images

    def fail(self, field: str, message: str) -> NoReturn:
        raise RecordError(self.location, field, message)

    # ---- scalars -----------------------------------------------------------------
    def nonblank_str(self, value: Any, field: str) -> str:
        if not isinstance(value, str):
            self.fail(field, f"expected a string, got {_type_name(value)}")
        if _is_blank(value):
            self.fail(field, "must not be empty")
        return value

    def record_id(self, value: Any) -> str:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            self.fail("id", f"expected a string or integer, got {_type_name(value)}")
        if isinstance(value, int):
            try:
                return str(value)
            except ValueError as e:  # more digits than int->str allows
                self.fail("id", f"integer id too long: {e}")
        return self.nonblank_str(value, "id")

    def answer(self, value: Any) -> str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            self.fail("answer", f"expected a string or number, got {_type_name(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            self.fail("answer", f"expected a finite number, got {value}")
        if isinstance(value, (int, float)):
            try:
                return str(value)
            except ValueError as e:
                self.fail("answer", f"number too long: {e}")
        return self.nonblank_str(value, "answer")

    # ---- images ------------------------------------------------------------------
    def image_ref(self, value: Any, field: str, index_text: str) -> str:
        if not isinstance(value, str):
            self.fail(field, f"{index_text}: expected a string (path or data URI), got {_type_name(value)}")
        if _is_blank(value):
            self.fail(field, f"{index_text}: must not be empty")
        if self.check_images:
            try:
                check_image(value, self.base_dir)
            except (ValueError, OSError) as e:
                self.fail(field, f"{index_text} {short_ref(value)!r}: {e}")
        if (
            self.base_dir is not None
            and not is_data_uri(value)
            and not is_remote_url(value)
            and not value.lower().startswith("file://")
        ):
            try:
                if not os.path.isabs(value):
                    return str(Path(self.base_dir) / value)
            except (ValueError, TypeError):  # odd characters: keep as written
                pass
        return value

    def images(self, value: Any) -> list[str]:
        if not isinstance(value, (list, tuple)):
            self.fail("images", f"expected a list of strings, got {_type_name(value)}")
        return [self.image_ref(v, f"images[{i}]", f"image {i}") for i, v in enumerate(value)]

    def image_text(self, value: Any, n_images: int) -> str | list[str]:
        if n_images == 0:
            self.fail("image_text", "the record has no images to describe")
        if isinstance(value, str):
            return self.nonblank_str(value, "image_text")
        if not isinstance(value, (list, tuple)):
            self.fail("image_text", f"expected a string or a list of strings, got {_type_name(value)}")
        if len(value) != n_images:
            self.fail("image_text", f"has {len(value)} entries for {n_images} images (one per image, in prompt "
                                    f"order: the 'images' field first, then image parts; or one string for all)")
        return [self.nonblank_str(v, f"image_text[{i}]") for i, v in enumerate(value)]

    # ---- prompts -----------------------------------------------------------------
    def content_part(self, part: Any, field: str) -> dict[str, Any]:
        if not isinstance(part, dict):
            self.fail(field, f"expected a content part object, got {_type_name(part)}")
        part = {k: v for k, v in part.items() if v is not None}
        kind = part.get("type")
        if kind not in PART_TYPES:
            shown = kind if isinstance(kind, str) else _type_name(kind)
            self.fail(f"{field}.type", f"expected one of {', '.join(PART_TYPES)}, got {shown!r}")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                self.fail(f"{field}.text", f"text part needs 'text' as a string, got {_type_name(part.get('text'))}")
        else:
            if "image" not in part and "url" not in part:
                self.fail(field, "image part needs 'image' (path or data URI) or 'url'")
            for key in ("image", "url"):
                if key in part:
                    part[key] = self.image_ref(part[key], f"{field}.{key}", "image")
        return part

    def message(self, msg: Any, field: str) -> tuple[dict[str, Any], bool]:
        """The cleaned message, and whether it is a user message with content."""
        if not isinstance(msg, dict):
            self.fail(field, f"expected a message object, got {_type_name(msg)}")
        msg = {k: v for k, v in msg.items() if v is not None}
        role = msg.get("role")
        if role not in ROLES:
            shown = role if isinstance(role, str) else _type_name(role)
            self.fail(f"{field}.role", f"expected one of {', '.join(ROLES)}, got {shown!r}")
        if "content" not in msg:
            self.fail(f"{field}.content", "message needs 'content'")
        content = msg["content"]
        if isinstance(content, str):
            has_content = not _is_blank(content)
        elif isinstance(content, (list, tuple)):
            if not content:
                self.fail(f"{field}.content", "content list must not be empty")
            content = [self.content_part(p, f"{field}.content[{j}]") for j, p in enumerate(content)]
            msg["content"] = content
            has_content = True
        else:
            self.fail(f"{field}.content", f"expected a string or a list of content parts, got {_type_name(content)}")
        return msg, role == "user" and has_content

    def prompt(self, value: Any, field: str) -> str | list[dict[str, Any]]:
        if isinstance(value, str):
            if _is_blank(value):
                self.fail(field, "must not be empty")
            return value
        if not isinstance(value, (list, tuple)):
            self.fail(field, f"expected a string or a list of messages, got {_type_name(value)}")
        if not value:
            self.fail(field, "message list must not be empty")
        out, has_user = [], False
        for i, msg in enumerate(value):
            cleaned, is_user = self.message(msg, f"{field}[{i}]")
            out.append(cleaned)
            has_user = has_user or is_user
        if not has_user:
            self.fail(field, "needs at least one 'user' message with non-empty content")
        return out

    # ---- tests -------------------------------------------------------------------
    def tests(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.nonblank_str(value, "tests")
        if isinstance(value, (list, tuple)):
            if not value:
                self.fail("tests", "test list must not be empty")
            return [self.nonblank_str(t, f"tests[{i}]") for i, t in enumerate(value)]
        if not isinstance(value, dict):
            self.fail("tests", f"expected a string, a list of strings or an object, got {_type_name(value)}")
        value = {k: v for k, v in value.items() if v is not None}
        if "io" in value:
            extra = sorted(k for k in value if k != "io")
            if extra:
                self.fail("tests", f"unexpected key {extra[0]!r} next to 'io' (allowed: io)")
            cases = value["io"]
            if not isinstance(cases, (list, tuple)) or not cases:
                self.fail("tests.io", f"expected a non-empty list of {{'stdin', 'stdout'}} objects, got {_type_name(cases)}")
            out = []
            for i, case in enumerate(cases):
                field = f"tests.io[{i}]"
                if not isinstance(case, dict):
                    self.fail(field, f"expected an object with 'stdin' and 'stdout', got {_type_name(case)}")
                for key in ("stdin", "stdout"):
                    if not isinstance(case.get(key), str):
                        self.fail(f"{field}.{key}", f"expected a string, got {_type_name(case.get(key))}")
                extra = sorted(k for k in case if k not in ("stdin", "stdout"))
                if extra:
                    self.fail(field, f"unexpected key {extra[0]!r} (allowed: stdin, stdout)")
                out.append({"stdin": case["stdin"], "stdout": case["stdout"]})
            return {"io": out}
        if "check" in value or "entry_point" in value:
            extra = sorted(k for k in value if k not in ("check", "entry_point", "prompt"))
            if extra:
                self.fail("tests", f"unexpected key {extra[0]!r} (allowed: check, entry_point, prompt)")
            for key in ("check", "entry_point"):
                if key not in value:
                    self.fail(f"tests.{key}", "missing (a check test needs 'check' and 'entry_point')")
                self.nonblank_str(value[key], f"tests.{key}")
            out = {"check": value["check"], "entry_point": value["entry_point"]}
            if "prompt" in value:  # the code prefix (signature + docstring) the completion continues
                out["prompt"] = self.nonblank_str(value["prompt"], "tests.prompt")
            return out
        self.fail("tests", "expected {'check': str, 'entry_point': str} or {'io': [{'stdin': str, 'stdout': str}, ...]}")


def _unknown_field_message(key: str) -> str:
    close = difflib.get_close_matches(key, KNOWN_FIELDS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (
        f"unknown field {key!r}{hint}; known fields: {', '.join(KNOWN_FIELDS)} "
        "(use allow_extra=True to keep extra fields in meta, or field_map to rename them)"
    )


def check_field_map(field_map: Mapping[str, str | None]) -> dict[str, str | None]:
    """Validate a field map (a configuration error is a plain ValueError, not a RecordError).

    Keys are the dataset's column names; values are a known field, "meta.<key>" (keep
    the column inside meta), or None (drop the column).
    """
    if not isinstance(field_map, Mapping):
        raise ValueError(f"field_map must be a mapping, got {type(field_map).__name__}")
    out: dict[str, str | None] = {}
    for src, dst in field_map.items():
        if not isinstance(src, str) or not src:
            raise ValueError(f"field_map: source names must be non-empty strings, got {src!r}")
        if dst is not None and not isinstance(dst, str):
            raise ValueError(f"field_map[{src!r}]: target must be a field name or None, got {dst!r}")
        if isinstance(dst, str) and dst not in KNOWN_FIELDS:
            if not (dst.startswith("meta.") and len(dst) > 5):
                raise ValueError(
                    f"field_map[{src!r}]: unknown target field {dst!r}; "
                    f"known fields: {', '.join(KNOWN_FIELDS)}, or 'meta.<key>', or None to drop"
                )
        out[src] = dst
    return out


def _apply_field_map(
    obj: dict[str, Any], field_map: Mapping[str, str | None], checker: _Checker
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Rename columns; returns the renamed object and the values bound for meta."""
    out: dict[str, Any] = {}
    source_of: dict[str, str] = {}
    to_meta: dict[str, Any] = {}
    for key, value in obj.items():
        dst = field_map[key] if key in field_map else key
        if dst is None:
            continue
        if dst.startswith("meta.") and key in field_map:
            to_meta[dst[5:]] = value
            continue
        if dst in source_of:
            if value is None:
                continue
            if out[dst] is not None:
                checker.fail(dst, f"both {source_of[dst]!r} and {key!r} map to {dst!r}")
        out[dst] = value
        source_of[dst] = key
    return out, to_meta


def record_from_obj(
    obj: Any,
    *,
    location: str,
    base_dir: str | os.PathLike[str] | None = None,
    allow_extra: bool = False,
    require_target: bool = True,
    check_images: bool = False,
    field_map: Mapping[str, str | None] | None = None,
    default_domain: str | None = None,
    default_id: str | None = None,
) -> PromptRecord:
    """Check one JSON-like object and build a `PromptRecord`; raise `RecordError`.

    location:       where the object came from, used in errors ("train.jsonl:12").
    base_dir:       directory relative image paths are resolved against (then stored
                    absolute); None leaves them as written and checks them against the
                    current directory.
    allow_extra:    put unknown top-level keys into `meta` instead of failing.
    require_target: a record needs `answer` or `tests` (False for generation-only sets).
    check_images:   open every image with PIL and verify it.
    field_map:      rename columns first, e.g. {"question": "prompt", "level": None}.
    default_domain: used when the object has no (or a null) `domain`.
    default_id:     used when the object has no (or a null) `id`.

    The input object is not modified.
    """
    ck = _Checker(location, base_dir, check_images)
    if not isinstance(obj, dict):
        ck.fail("<record>", f"expected a JSON object, got {_type_name(obj)}")
    for key in obj:
        if not isinstance(key, str):
            ck.fail("<record>", f"field names must be strings, got {key!r}")
    to_meta: dict[str, Any] = {}
    if field_map:
        obj, to_meta = _apply_field_map(obj, check_field_map(field_map), ck)
    present = {k: v for k, v in obj.items() if v is not None}

    extras = {k: v for k, v in present.items() if k not in KNOWN_FIELDS}
    if extras and not allow_extra:
        key = next(iter(extras))
        ck.fail(key, _unknown_field_message(key))

    raw_id = present.get("id", default_id)
    if raw_id is None:
        ck.fail("id", "missing (required; set generate_ids=True to number records)")
    record_id = ck.record_id(raw_id)

    domain = present.get("domain", default_domain)
    if domain is None:
        ck.fail("domain", "missing (required; or set default_domain)")
    domain = ck.nonblank_str(domain, "domain")

    if "prompt" not in present:
        ck.fail("prompt", "missing (required)")
    prompt = ck.prompt(present["prompt"], "prompt")

    answer = ck.answer(present["answer"]) if "answer" in present else None
    tests = ck.tests(present["tests"]) if "tests" in present else None
    images = ck.images(present["images"]) if "images" in present else []
    n_images = len(images) + _count_image_parts(prompt)
    image_text = ck.image_text(present["image_text"], n_images) if "image_text" in present else None
    teacher_prompt = ck.prompt(present["teacher_prompt"], "teacher_prompt") if "teacher_prompt" in present else None
    verifier = ck.nonblank_str(present["verifier"], "verifier") if "verifier" in present else None
    teacher = ck.nonblank_str(present["teacher"], "teacher") if "teacher" in present else None

    meta: dict[str, Any] = {}
    if "meta" in present:
        if not isinstance(present["meta"], dict):
            ck.fail("meta", f"expected an object, got {_type_name(present['meta'])}")
        meta = dict(present["meta"])
        for key in meta:
            if not isinstance(key, str):
                ck.fail("meta", f"keys must be strings, got {key!r}")
    for source, extra in (("field_map", to_meta), ("extra field", extras if allow_extra else {})):
        for key, value in extra.items():
            if key in meta:
                ck.fail("meta", f"{source} {key!r} would overwrite meta[{key!r}]")
            meta[key] = value

    if require_target and answer is None and tests is None:
        ck.fail("answer", "needs 'answer' or 'tests' (use require_target=False for generation-only prompts)")

    return PromptRecord(
        id=record_id,
        domain=domain,
        prompt=prompt,
        answer=answer,
        tests=tests,
        images=images,
        image_text=image_text,
        teacher_prompt=teacher_prompt,
        verifier=verifier,
        teacher=teacher,
        meta=meta,
        location=location,
    )


def _count_image_parts(prompt: Any) -> int:
    if isinstance(prompt, str):
        return 0
    return sum(1 for m in prompt if isinstance(m.get("content"), list)
               for p in m["content"] if p.get("type") == "image")


def validate_record(record: PromptRecord, *, location: str = "<record>", **kwargs: Any) -> PromptRecord:
    """Re-check a record built in code (e.g. by a dataset adapter); returns the
    normalized copy. Keyword arguments are those of `record_from_obj`."""
    return record_from_obj(record.to_json(), location=location, **kwargs)
