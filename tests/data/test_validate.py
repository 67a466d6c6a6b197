"""Every schema rule of `record_from_obj`, with the error's location and field."""

from __future__ import annotations

import pickle

import pytest

from uniopd.data.records import PromptRecord
from uniopd.data.validate import KNOWN_FIELDS, RecordError, record_from_obj, validate_record

LOC = "data/train.jsonl:12"


def base(**over):
    obj = {"id": "r1", "domain": "math", "prompt": "What is 1+1?", "answer": "2"}
    obj.update(over)
    return {k: v for k, v in obj.items() if v is not ...}


def build(obj, **kw):
    return record_from_obj(obj, location=LOC, **kw)


def err(obj, field, *fragments, **kw) -> RecordError:
    with pytest.raises(RecordError) as info:
        build(obj, **kw)
    e = info.value
    assert e.location == LOC
    assert e.field == field, str(e)
    assert LOC in str(e)
    if not field.startswith("<"):
        assert f"field '{field}'" in str(e)
    for frag in fragments:
        assert frag in str(e), str(e)
    return e


# ---- the error type -------------------------------------------------------------------


def test_error_str_format():
    e = err(base(answer=[1]), "answer")
    assert str(e) == "data/train.jsonl:12: field 'answer': expected a string or number, got list"
    assert e.message == "expected a string or number, got list"
    assert isinstance(e, ValueError)


def test_error_pickles():
    e = RecordError("a.jsonl:1", "id", "bad")
    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.location, e2.field, e2.message, str(e2)) == (e.location, e.field, e.message, str(e))


def test_minimal_record():
    rec = build(base())
    assert rec == PromptRecord(id="r1", domain="math", prompt="What is 1+1?", answer="2")


def test_full_record_roundtrip():
    obj = {
        "id": "full",
        "domain": "code",
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Write f."}]},
        ],
        "tests": {"check": "def check(f): assert f() == 1", "entry_point": "f"},
        "teacher_prompt": "Write f. Hint: return 1.",
        "verifier": "code",
        "teacher": "big",
        "meta": {"source": "x", "level": 3},
    }
    rec = build(obj)
    assert rec.to_json() == obj
    assert build(rec.to_json()) == rec


def test_not_an_object():
    e = err([1, 2], "<record>", "expected a JSON object, got list")
    assert str(e) == f"{LOC}: expected a JSON object, got list"


# ---- id -------------------------------------------------------------------------------


def test_id_required():
    err(base(id=...), "id", "missing")


def test_id_null_is_missing():
    err(base(id=None), "id", "missing")


def test_id_int_converted():
    assert build(base(id=7)).id == "7"


@pytest.mark.parametrize("bad,frag", [(True, "boolean"), (1.5, "number"), ([], "list"), ({}, "object")])
def test_id_bad_types(bad, frag):
    err(base(id=bad), "id", f"got {frag}")


@pytest.mark.parametrize("bad", ["", "   "])
def test_id_blank(bad):
    err(base(id=bad), "id", "must not be empty")


def test_default_id_used_only_when_missing():
    assert build(base(id=...), default_id="f-3").id == "f-3"
    assert build(base(id="mine"), default_id="f-3").id == "mine"


# ---- domain ---------------------------------------------------------------------------


def test_domain_required():
    err(base(domain=...), "domain", "missing")


@pytest.mark.parametrize("bad", ["", " ", 3, None])
def test_domain_bad(bad):
    err(base(domain=bad), "domain")


def test_default_domain():
    assert build(base(domain=...), default_domain="code").domain == "code"
    assert build(base(domain="math"), default_domain="code").domain == "math"


# ---- prompt ---------------------------------------------------------------------------


def test_prompt_required():
    err(base(prompt=...), "prompt", "missing")


@pytest.mark.parametrize("bad", ["", " \n\t "])
def test_prompt_blank(bad):
    err(base(prompt=bad), "prompt", "must not be empty")


@pytest.mark.parametrize("bad", [3, {"role": "user"}, True])
def test_prompt_bad_type(bad):
    err(base(prompt=bad), "prompt", "expected a string or a list of messages")


def test_prompt_empty_list():
    err(base(prompt=[]), "prompt", "must not be empty")


def test_prompt_message_not_object():
    err(base(prompt=["hi"]), "prompt[0]", "expected a message object")


def test_prompt_bad_role():
    err(base(prompt=[{"role": "human", "content": "x"}]), "prompt[0].role", "'human'", "user")


def test_prompt_missing_role():
    err(base(prompt=[{"content": "x"}]), "prompt[0].role")


def test_prompt_missing_content():
    err(base(prompt=[{"role": "user"}]), "prompt[0].content", "needs 'content'")


def test_prompt_bad_content():
    err(base(prompt=[{"role": "user", "content": 5}]), "prompt[0].content", "got number")


def test_prompt_empty_content_list():
    err(base(prompt=[{"role": "user", "content": []}]), "prompt[0].content", "must not be empty")


def test_prompt_needs_user_message():
    err(base(prompt=[{"role": "system", "content": "x"}]), "prompt", "at least one 'user'")


def test_prompt_blank_user_message_does_not_count():
    err(base(prompt=[{"role": "user", "content": "  "}]), "prompt", "at least one 'user'")


def test_prompt_all_roles_ok():
    msgs = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": ""},
        {"role": "tool", "content": "t", "tool_call_id": "c1"},
    ]
    assert build(base(prompt=msgs)).prompt == msgs


def test_content_part_bad_type():
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    err(base(prompt=msgs), "prompt[0].content[0].type", "'image_url'", "text, image")


def test_content_part_not_object():
    err(base(prompt=[{"role": "user", "content": ["hi"]}]), "prompt[0].content[0]", "content part")


def test_text_part_needs_text():
    msgs = [{"role": "user", "content": [{"type": "text"}]}]
    err(base(prompt=msgs), "prompt[0].content[0].text", "needs 'text'")
    msgs = [{"role": "user", "content": [{"type": "text", "text": 3}]}]
    err(base(prompt=msgs), "prompt[0].content[0].text")


def test_image_part_needs_image_or_url():
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
    err(base(prompt=msgs), "prompt[0].content[0]", "'image'", "'url'")


def test_image_part_bad_value():
    msgs = [{"role": "user", "content": [{"type": "image", "image": 3}]}]
    err(base(prompt=msgs), "prompt[0].content[0].image", "expected a string")


def test_parts_drop_null_keys():
    # parquet / datasets fill missing struct fields with None
    msgs = [{"role": "user", "content": [{"type": "text", "text": "hi", "image": None, "url": None}], "name": None}]
    rec = build(base(prompt=msgs))
    assert rec.prompt == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert msgs[0]["name"] is None  # input untouched


# ---- answer ---------------------------------------------------------------------------


@pytest.mark.parametrize("value,expected", [("42", "42"), (3, "3"), (3.0, "3.0"), (-0.5, "-0.5"), (10**30, str(10**30))])
def test_answer_values(value, expected):
    assert build(base(answer=value)).answer == expected


@pytest.mark.parametrize("bad,frag", [(True, "boolean"), ([1], "list"), ({"a": 1}, "object")])
def test_answer_bad_types(bad, frag):
    err(base(answer=bad), "answer", f"expected a string or number, got {frag}")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_answer_not_finite(bad):
    err(base(answer=bad), "answer", "finite")


def test_answer_blank():
    err(base(answer="  "), "answer", "must not be empty")


# ---- tests ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tests",
    [
        "assert f(1) == 2",
        ["assert f(1) == 2", "assert f(2) == 3"],
        {"check": "def check(c): pass", "entry_point": "f"},
        {"io": [{"stdin": "1\n", "stdout": "2\n"}, {"stdin": "", "stdout": "0"}]},
    ],
)
def test_tests_valid(tests):
    assert build(base(answer=..., tests=tests)).tests == tests


@pytest.mark.parametrize(
    "tests,field,frag",
    [
        ("", "tests", "must not be empty"),
        ([], "tests", "must not be empty"),
        (["ok", 3], "tests[1]", "expected a string"),
        (["ok", " "], "tests[1]", "must not be empty"),
        (5, "tests", "expected a string, a list of strings or an object"),
        ({}, "tests", "check"),
        ({"check": "x"}, "tests.entry_point", "missing"),
        ({"entry_point": "f"}, "tests.check", "missing"),
        ({"check": "x", "entry_point": 3}, "tests.entry_point", "expected a string"),
        ({"check": "x", "entry_point": "f", "timeout": 3}, "tests", "'timeout'"),
        ({"io": []}, "tests.io", "non-empty list"),
        ({"io": "1 2"}, "tests.io", "non-empty list"),
        ({"io": [{"stdin": "1"}]}, "tests.io[0].stdout", "expected a string"),
        ({"io": [{"stdin": 1, "stdout": "2"}]}, "tests.io[0].stdin", "got number"),
        ({"io": [3]}, "tests.io[0]", "expected an object"),
        ({"io": [{"stdin": "", "stdout": "", "x": 1}]}, "tests.io[0]", "'x'"),
        ({"io": [{"stdin": "", "stdout": ""}], "check": "c"}, "tests", "'check'"),
    ],
)
def test_tests_invalid(tests, field, frag):
    err(base(answer=..., tests=tests), field, frag)


def test_tests_dict_null_keys_dropped():
    rec = build(base(answer=..., tests={"check": "c", "entry_point": "f", "io": None}))
    assert rec.tests == {"check": "c", "entry_point": "f"}


# ---- target ---------------------------------------------------------------------------


def test_needs_answer_or_tests():
    err(base(answer=...), "answer", "needs 'answer' or 'tests'")


def test_no_target_allowed_when_not_required():
    rec = build(base(answer=...), require_target=False)
    assert rec.answer is None and rec.tests is None


def test_null_answer_is_absent():
    err(base(answer=None), "answer", "needs 'answer' or 'tests'")


# ---- images ---------------------------------------------------------------------------


def test_images_must_be_list():
    err(base(images="a.png"), "images", "expected a list of strings")


def test_images_entries_strings():
    err(base(images=["a.png", 3]), "images[1]", "image 1", "expected a string")
    err(base(images=[""]), "images[0]", "must not be empty")


def test_images_kept_without_base_dir():
    assert build(base(images=["a.png"])).images == ["a.png"]


def test_images_resolved_against_base_dir(tmp_path):
    rec = build(base(images=["img/a.png", "/abs/b.png", "data:image/png;base64,AAAA"]), base_dir=tmp_path)
    assert rec.images == [str(tmp_path / "img/a.png"), "/abs/b.png", "data:image/png;base64,AAAA"]


# ---- other fields ---------------------------------------------------------------------


def test_teacher_prompt_same_rules():
    err(base(teacher_prompt=""), "teacher_prompt", "must not be empty")
    err(base(teacher_prompt=[{"role": "system", "content": "x"}]), "teacher_prompt", "'user'")
    err(base(teacher_prompt=[{"role": "bot", "content": "x"}]), "teacher_prompt[0].role")
    msgs = [{"role": "user", "content": "with hint"}]
    assert build(base(teacher_prompt=msgs)).teacher_prompt == msgs


@pytest.mark.parametrize("key", ["verifier", "teacher"])
@pytest.mark.parametrize("bad", ["", " ", 1, ["x"]])
def test_names_nonblank_strings(key, bad):
    err(base(**{key: bad}), key)


@pytest.mark.parametrize("bad", [[1], "x", 3])
def test_meta_object(bad):
    err(base(meta=bad), "meta", "expected an object")


def test_meta_copied():
    meta = {"a": [1, 2]}
    rec = build(base(meta=meta))
    assert rec.meta == meta and rec.meta is not meta


# ---- unknown keys ---------------------------------------------------------------------


def test_unknown_key_error_with_hint():
    e = err(base(anwser="2"), "anwser", "unknown field 'anwser'", "did you mean 'answer'", "known fields")
    for key in KNOWN_FIELDS:
        assert key in str(e)


def test_unknown_key_without_close_match():
    e = err(base(zzzz=1), "zzzz", "unknown field 'zzzz'")
    assert "did you mean" not in str(e)


def test_allow_extra_moves_into_meta():
    rec = build(base(source="gsm8k", level=2, meta={"a": 1}), allow_extra=True)
    assert rec.meta == {"a": 1, "source": "gsm8k", "level": 2}
    assert build(rec.to_json()) == rec  # the result is schema-clean


def test_allow_extra_conflict_with_meta():
    err(base(source="x", meta={"source": "y"}), "meta", "'source'", allow_extra=True)


def test_null_unknown_key_ignored():
    # a column full of None in parquet is not an error
    assert build(base(extra_col=None)).meta == {}


# ---- field map ------------------------------------------------------------------------


def test_field_map_renames():
    obj = {"id": "a", "question": "Q?", "solution": 4, "level": 3, "junk": "x"}
    rec = build(
        obj,
        field_map={"question": "prompt", "solution": "answer", "level": "meta.level", "junk": None},
        default_domain="math",
    )
    assert (rec.prompt, rec.answer, rec.meta, rec.domain) == ("Q?", "4", {"level": 3}, "math")


def test_field_map_conflict():
    obj = {"id": "a", "domain": "m", "question": "Q?", "prompt": "P?", "answer": "1"}
    err(obj, "prompt", "'question'", "'prompt'", field_map={"question": "prompt"})


def test_field_map_conflict_ignores_null():
    obj = {"id": "a", "domain": "m", "question": None, "prompt": "P?", "answer": "1"}
    assert build(obj, field_map={"question": "prompt"}).prompt == "P?"


def test_field_map_bad_target_is_config_error():
    with pytest.raises(ValueError, match="unknown target field 'promt'") as info:
        build(base(), field_map={"q": "promt"})
    assert not isinstance(info.value, RecordError)


def test_field_map_meta_conflict():
    obj = base(lvl=1, meta={"level": 2})
    err(obj, "meta", "'level'", field_map={"lvl": "meta.level"})


# ---- helpers --------------------------------------------------------------------------


def test_validate_record():
    rec = PromptRecord(id="x", domain="m", prompt="p", answer="1")
    assert validate_record(rec) == rec
    with pytest.raises(RecordError, match="<record>: field 'domain'"):
        validate_record(PromptRecord(id="x", domain="", prompt="p", answer="1"))


def test_input_not_mutated():
    obj = base(extra=1, images=["a.png"])
    snapshot = repr(obj)
    build(obj, allow_extra=True, base_dir="/tmp")
    assert repr(obj) == snapshot


def test_image_text_one_per_image_or_one_for_all(tmp_path):
    imgs = ["data:image/png;base64,iVBORw0KGgo=", "data:image/png;base64,iVBORw0KGgo="]
    assert build(base(images=imgs, image_text=["a", "b"])).image_text == ["a", "b"]
    assert build(base(images=imgs, image_text="two squares")).image_text == "two squares"
    err(base(images=imgs, image_text=["a"]), "image_text", "1 entries for 2 images")
    err(base(image_text="a red circle"), "image_text", "no images")
    err(base(images=imgs[:1], image_text=[" "]), "image_text[0]", "must not be empty")
    rec = build(base(images=imgs[:1], image_text="x"))
    assert build(rec.to_json()) == rec
