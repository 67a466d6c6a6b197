"""Property test: arbitrary JSONL lines never crash the loader, and nothing is dropped.

For any file of text lines (valid records, near-records, random JSON, broken JSON,
unicode, huge numbers, NaN literals, deep nesting):
  * load_records raises nothing but RecordError / ValueError / FileNotFoundError;
  * with skip_invalid=True, records + skipped == non-blank lines (or, when no line is
    valid, a ValueError that counts them all);
  * every returned record re-validates from its to_json().
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from uniopd.data.loader import load_records
from uniopd.data.validate import KNOWN_FIELDS, RecordError, record_from_obj

SCHEMA_WORDS = KNOWN_FIELDS + ("role", "content", "type", "text", "image", "url", "check", "entry_point", "io", "stdin", "stdout")

# text without "\n" (a JSONL line break) and without surrogates (not encodable)
line_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"), max_size=40)

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | line_text
    | st.sampled_from(["", " ", "user", "system", "tool", "text", "image", "math", "x.png", "data:image/png;base64,AA=="])
)
keys = st.sampled_from(SCHEMA_WORDS) | st.text(max_size=8)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=5),
    max_leaves=20,
)

nonblank = st.text(min_size=1, max_size=12).filter(lambda s: s.strip())
parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": line_text}),
    st.fixed_dictionaries({"type": st.just("image")}, optional={"image": json_values, "url": json_values}),
    json_values,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "tool", "bot"]) | json_values},
        optional={"content": nonblank | st.lists(parts, max_size=3) | json_values, "name": json_values},
    ),
    max_size=3,
)
tests_values = st.one_of(
    nonblank,
    st.lists(nonblank | json_values, max_size=3),
    st.fixed_dictionaries({"check": nonblank, "entry_point": nonblank}),
    st.fixed_dictionaries({"io": st.lists(st.fixed_dictionaries({"stdin": line_text, "stdout": line_text}), max_size=2)}),
    st.dictionaries(st.sampled_from(["check", "entry_point", "io", "timeout"]), json_values, max_size=3),
)
record_like = st.fixed_dictionaries(
    {},
    optional={
        "id": nonblank | st.integers() | json_values,
        "domain": st.sampled_from(["math", "code"]) | json_values,
        "prompt": nonblank | messages | json_values,
        "answer": nonblank | st.integers() | st.floats() | json_values,
        "tests": tests_values | json_values,
        "images": st.lists(line_text | st.just("data:image/png;base64,AA=="), max_size=2) | json_values,
        "teacher_prompt": nonblank | messages,
        "verifier": nonblank | json_values,
        "teacher": nonblank | json_values,
        "meta": st.dictionaries(st.text(max_size=5), json_values, max_size=3) | json_values,
        "extra": json_values,
    },
)


def _png_uri() -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


PNG_URI = _png_uri()
good_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20).filter(
    lambda s: s.strip()
)
good_parts = st.lists(
    st.fixed_dictionaries({"type": st.just("text"), "text": line_text}) | st.just({"type": "image", "image": PNG_URI}),
    min_size=1,
    max_size=3,
)
good_messages = st.tuples(
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "assistant", "tool"]), "content": line_text}), max_size=2),
    st.fixed_dictionaries({"role": st.just("user"), "content": good_text | good_parts}),
).map(lambda t: [*t[0], t[1]])
good_record = st.fixed_dictionaries(
    {
        "id": good_text | st.integers(min_value=0),
        "domain": st.sampled_from(["math", "code", "vqa"]),
        "prompt": good_text | good_messages,
        "answer": good_text | st.integers() | st.floats(allow_nan=False, allow_infinity=False),
    },
    optional={
        "tests": st.one_of(
            good_text,
            st.lists(good_text, min_size=1, max_size=3),
            st.fixed_dictionaries({"check": good_text, "entry_point": good_text}),
            st.fixed_dictionaries(
                {"io": st.lists(st.fixed_dictionaries({"stdin": line_text, "stdout": line_text}), min_size=1, max_size=2)}
            ),
        ),
        "images": st.lists(st.just(PNG_URI), max_size=2),
        "teacher_prompt": good_text | good_messages,
        "verifier": good_text,
        "teacher": good_text,
        "meta": st.dictionaries(st.text(max_size=5), json_values, max_size=3),
    },
)


@st.composite
def near_record(draw):
    """A good record, then at most one mutation (drop, replace or add a key)."""
    obj = dict(draw(good_record))
    action = draw(st.sampled_from(["keep", "keep", "drop", "replace", "add"]))
    if action == "drop":
        obj.pop(draw(st.sampled_from(sorted(obj))))
    elif action == "replace":
        obj[draw(st.sampled_from(sorted(obj)))] = draw(json_values)
    elif action == "add":
        obj[draw(keys)] = draw(json_values)
    return obj


special_lines = st.sampled_from(
    [
        "NaN",
        "-Infinity",
        '{"id": "n", "domain": "math", "prompt": "p", "answer": NaN}',
        '{"id": "i", "domain": "math", "prompt": "p", "answer": 1e999}',
        '{"id": "f", "domain": "math", "prompt": "p", "answer": 1.50}',
        '{"id": "m", "domain": "math", "prompt": "p", "answer": "1", "meta": {"x": NaN}}',
        '{"id": ' + "9" * 5000 + ', "domain": "math", "prompt": "p", "answer": "1"}',
        "[" * 5000 + "]" * 5000,
        '{"a": ' * 3000 + "1" + "}" * 3000,
        "{",
        "}",
        '{"id": "dup", "domain": "m", "prompt": "p", "answer": "1"}',
        "\ufeff{}",
        "\x00",
        "\u3000",
        "\x1c",
        "\r",
    ]
)

lines_strategy = st.lists(
    st.one_of(
        near_record().map(lambda o: json.dumps(o, ensure_ascii=False)),
        near_record().map(json.dumps),
        record_like.map(lambda o: json.dumps(o, ensure_ascii=False)),
        record_like.map(json.dumps),
        json_values.map(json.dumps),
        line_text,
        special_lines,
        st.just(""),
    ),
    max_size=8,
)

OPTIONS = st.fixed_dictionaries(
    {
        "allow_extra": st.booleans(),
        "require_target": st.booleans(),
        "generate_ids": st.booleans(),
        "check_images": st.booleans(),
        "default_domain": st.none() | st.just("math"),
    }
)


def _write(lines: list[str], directory: Path) -> Path:
    path = directory / "fuzz.jsonl"
    # a leading blank line keeps a generated "\ufeff" away from the BOM position
    path.write_bytes(("\n" + "\n".join(lines) + "\n").encode("utf-8"))
    return path


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(lines=lines_strategy, options=OPTIONS)
def test_loader_total_and_sound(lines, options):
    nonblank_lines = [i + 2 for i, line in enumerate(lines) if line.strip()]  # +1 leading line, 1-based
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(lines, Path(tmp))

        # strict mode: only the documented exceptions
        try:
            load_records(path, **options)
        except RecordError as e:
            assert e.location.startswith(str(path)) and isinstance(e.field, str)
        except ValueError:
            pass

        # skipping mode: every non-blank line is accounted for
        try:
            res = load_records(path, skip_invalid=True, **options)
        except RecordError:
            raise AssertionError("skip_invalid=True raised a RecordError for a JSONL file")
        except ValueError as e:
            if nonblank_lines:
                assert f"all {len(nonblank_lines)} invalid" in str(e), str(e)
                event("all lines invalid")
            else:
                assert "no records" in str(e)
            return
        event(f"valid records returned: {min(len(res.records), 3)}{'+' if len(res.records) >= 3 else ''}")
        assert len(res.records) + len(res.skipped) == len(nonblank_lines)
        skipped_lines = [int(s.location.rsplit(":", 1)[1]) for s in res.skipped]
        assert len(set(skipped_lines)) == len(skipped_lines)
        assert set(skipped_lines) <= set(nonblank_lines)
        assert len({r.id for r in res.records}) == len(res.records)

        for rec in res.records:
            again = record_from_obj(
                rec.to_json(), location="again", require_target=options["require_target"]
            )
            assert json.dumps(again.to_json(), sort_keys=True) == json.dumps(rec.to_json(), sort_keys=True)
            json.dumps(rec.to_json())  # serializable
