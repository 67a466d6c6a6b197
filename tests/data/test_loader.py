"""load_records over every source format, skipping, field maps, ids, and write_records."""

from __future__ import annotations

import gzip
import json
import logging
import os

import pytest

from uniopd.data.loader import LoadResult, SkippedRecord, detect_format, iter_jsonl_raw, load_records, write_records
from uniopd.data.records import PromptRecord
from uniopd.data.validate import RecordError


def rec(i, **over):
    obj = {"id": f"r{i}", "domain": "math", "prompt": f"What is {i}+1?", "answer": str(i + 1)}
    obj.update(over)
    return obj


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


# ---- JSONL ----------------------------------------------------------------------------


def test_jsonl_basic_and_blank_lines(tmp_path):
    p = write_jsonl(tmp_path / "train.jsonl", [rec(0), "", "   \t", rec(1), ""])
    res = load_records(p)
    assert isinstance(res, LoadResult)
    assert [r.id for r in res.records] == ["r0", "r1"]
    assert res.skipped == [] and res.source == str(p)
    assert res.summary() == f"loaded 2 records from {p}"
    assert len(res) == 2 and list(res) == res.records


def test_jsonl_crlf_bom_and_gzip(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(rec(0)).encode() + b"\r\n\r\n" + json.dumps(rec(1)).encode() + b"\r\n")
    assert len(load_records(p).records) == 2
    g = tmp_path / "b.jsonl.gz"
    with gzip.open(g, "wt") as f:
        f.write(json.dumps(rec(0)) + "\n")
    assert load_records(g, generate_ids=True).records[0].id == "r0"


def test_jsonl_malformed_line(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", [rec(0), "", '{"id": "x",', rec(1)])
    with pytest.raises(RecordError) as info:
        load_records(p)
    e = info.value
    assert e.location == f"{p}:3" and e.field == "<json>"
    assert "invalid JSON" in str(e) and "Expecting" in str(e) and f"{p}:3" in str(e)


def test_jsonl_invalid_utf8(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_bytes(json.dumps(rec(0)).encode() + b"\n\xff\xfe\n")
    res = load_records(p, skip_invalid=True)
    assert res.skipped[0].location == f"{p}:2" and "UTF-8" in res.skipped[0].message


def test_jsonl_line_not_object(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", [rec(0), "[1, 2]"])
    with pytest.raises(RecordError, match="expected a JSON object, got list") as info:
        load_records(p)
    assert info.value.location == f"{p}:2" and info.value.field == "<record>"


def test_unicode_line_separator_inside_string(tmp_path):
    # U+2028 is a line break for str.splitlines but not for JSONL
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps(rec(0, prompt="a\u2028b"), ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_records(p).records[0].prompt == "a\u2028b"


def test_iter_jsonl_raw(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", ["", "[1]", "3", "{bad"])
    it = iter_jsonl_raw(p)
    assert next(it) == (2, [1]) and next(it) == (3, 3)
    with pytest.raises(RecordError, match=":4"):
        next(it)
    with pytest.raises(FileNotFoundError):
        list(iter_jsonl_raw(tmp_path / "nope.jsonl"))


# ---- errors about the source ----------------------------------------------------------


@pytest.mark.parametrize("name", ["nope.jsonl", "nope.csv", "no_dir"])
def test_missing_file(tmp_path, name):
    p = tmp_path / name
    with pytest.raises(FileNotFoundError) as info:
        load_records(p)
    assert str(p) in str(info.value) and info.value.filename == str(p)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_jsonl(tmp_path, content):
    p = tmp_path / "e.jsonl"
    p.write_text(content)
    with pytest.raises(ValueError, match="no records in .*e.jsonl"):
        load_records(p)
    with pytest.raises(ValueError, match="no records"):
        load_records(p, skip_invalid=True)


@pytest.mark.parametrize("content", ["", "[]"])
def test_empty_json(tmp_path, content):
    p = tmp_path / "e.json"
    p.write_text(content)
    with pytest.raises(ValueError, match="no records"):
        load_records(p)


def test_unsupported_suffix(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported"):
        load_records(p)


def test_plain_directory_is_not_a_dataset(tmp_path):
    with pytest.raises(ValueError, match="save_to_disk"):
        load_records(tmp_path)


def test_detect_format(tmp_path):
    assert detect_format("a.JSONL") == "jsonl" and detect_format("a.ndjson.gz") == "jsonl"
    assert detect_format("a.json") == "json" and detect_format("a.parquet") == "parquet"
    assert detect_format(tmp_path) == "datasets" and detect_format("hf:gsm8k:test") == "hf"


# ---- skip_invalid ---------------------------------------------------------------------


def test_skip_invalid_counts_and_summary(tmp_path, caplog):
    lines = [rec(0), rec(1, prompt=""), "", "{oops", rec(2), rec(3, answer=[1]), rec(4)]
    p = write_jsonl(tmp_path / "x.jsonl", lines)
    with pytest.raises(RecordError) as info:
        load_records(p)
    assert info.value.location == f"{p}:2" and info.value.field == "prompt"
    with caplog.at_level(logging.WARNING, logger="uniopd.data.loader"):
        res = load_records(p, skip_invalid=True)
    assert [r.id for r in res.records] == ["r0", "r2", "r4"]
    assert [(s.location, s.field) for s in res.skipped] == [(f"{p}:2", "prompt"), (f"{p}:4", "<json>"), (f"{p}:6", "answer")]
    assert res.skipped[2] == SkippedRecord(f"{p}:6", "answer", "expected a string or number, got list")
    s = res.summary()
    assert s.startswith(f"loaded 3 records from {p}, skipped 3 invalid ({p}:2 field 'prompt': must not be empty, ")
    assert f"{p}:6 field 'answer': expected a string or number, got list)" in s
    assert any("skipped 3 invalid" in r.getMessage() for r in caplog.records)


def test_summary_truncates():
    res = LoadResult(records=[], skipped=[SkippedRecord(f"f:{i}", "id", "bad") for i in range(5)], source="f")
    assert res.summary().endswith("(f:0 field 'id': bad, f:1 field 'id': bad, f:2 field 'id': bad, and 2 more)")


def test_all_invalid_still_raises(tmp_path):
    p = write_jsonl(tmp_path / "x.jsonl", [rec(0, domain=""), "{"])
    with pytest.raises(ValueError, match="all 2 invalid") as info:
        load_records(p, skip_invalid=True)
    assert f"{p}:1" in str(info.value)


# ---- duplicate ids --------------------------------------------------------------------


def test_duplicate_ids(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [rec(0), rec(1), rec(2, id="r0")])
    with pytest.raises(RecordError) as info:
        load_records(p)
    e = info.value
    assert (e.location, e.field) == (f"{p}:3", "id")
    assert "duplicate id 'r0'" in str(e) and f"first at {p}:1" in str(e)
    res = load_records(p, skip_invalid=True)
    assert [r.id for r in res.records] == ["r0", "r1"] and res.skipped[0].location == f"{p}:3"


def test_int_and_str_ids_collide(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [rec(0, id=5), rec(1, id="5")])
    with pytest.raises(RecordError, match="duplicate id '5'"):
        load_records(p)


# ---- generated ids, defaults, field maps ----------------------------------------------


def test_id_required_without_generate(tmp_path):
    p = write_jsonl(tmp_path / "g.jsonl", [{k: v for k, v in rec(0).items() if k != "id"}])
    with pytest.raises(RecordError, match="field 'id': missing") as info:
        load_records(p)
    assert info.value.location == f"{p}:1"


def test_generated_ids_use_location_number(tmp_path):
    noid = {k: v for k, v in rec(0).items() if k != "id"}
    p = write_jsonl(tmp_path / "gsm.test.jsonl", [noid, "", noid, rec(9, id="keep")])
    res = load_records(p, generate_ids=True)
    assert [r.id for r in res.records] == ["gsm.test-1", "gsm.test-3", "keep"]
    j = tmp_path / "set.json"
    j.write_text(json.dumps([noid, noid]))
    assert [r.id for r in load_records(j, generate_ids=True).records] == ["set-0", "set-1"]


def test_generated_id_collides_with_explicit(tmp_path):
    noid = {k: v for k, v in rec(0).items() if k != "id"}
    p = write_jsonl(tmp_path / "s.jsonl", [rec(0, id="s-2"), noid])
    with pytest.raises(RecordError, match="duplicate id 's-2'"):
        load_records(p, generate_ids=True)


def test_field_map_and_default_domain(tmp_path):
    rows = [{"question": "1+1?", "solution": 2, "level": "easy", "idx": 0}, {"question": "2+2?", "solution": "4", "idx": 1}]
    p = write_jsonl(tmp_path / "foreign.jsonl", rows)
    with pytest.raises(RecordError, match="unknown field 'question'"):
        load_records(p, generate_ids=True, default_domain="math")
    res = load_records(
        p,
        field_map={"question": "prompt", "solution": "answer", "level": "meta.level", "idx": None},
        default_domain="math",
        generate_ids=True,
    )
    r0, r1 = res.records
    assert (r0.id, r0.domain, r0.prompt, r0.answer, r0.meta) == ("foreign-1", "math", "1+1?", "2", {"level": "easy"})
    assert (r1.answer, r1.meta) == ("4", {})


def test_bad_options(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [rec(0)])
    with pytest.raises(ValueError, match="field_map"):
        load_records(p, field_map={"q": "question"})
    with pytest.raises(ValueError, match="default_domain"):
        load_records(p, default_domain="")


def test_allow_extra_and_require_target(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"id": "a", "domain": "chat", "prompt": "hi", "src": "x"}])
    with pytest.raises(RecordError, match="unknown field 'src'"):
        load_records(p, require_target=False)
    with pytest.raises(RecordError, match="needs 'answer' or 'tests'"):
        load_records(p, allow_extra=True)
    res = load_records(p, allow_extra=True, require_target=False)
    assert res.records[0].meta == {"src": "x"} and res.records[0].answer is None


# ---- JSON -----------------------------------------------------------------------------


def test_json_list(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps([rec(0), rec(1, answer=None, tests="assert True"), rec(2, domain=3)], indent=2))
    with pytest.raises(RecordError) as info:
        load_records(p)
    assert info.value.location == f"{p} item 2" and info.value.field == "domain"
    res = load_records(p, skip_invalid=True)
    assert [r.id for r in res.records] == ["r0", "r1"]
    assert res.skipped[0].location == f"{p} item 2"
    assert f"{p} item 2 field 'domain'" in res.summary()


def test_json_not_a_list(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps(rec(0)))
    with pytest.raises(ValueError, match="expected a JSON list"):
        load_records(p)


def test_json_malformed_file_raises_even_when_skipping(tmp_path):
    p = tmp_path / "a.json"
    p.write_text('[\n{"id": 1},\n{oops}\n]')
    with pytest.raises(RecordError) as info:
        load_records(p, skip_invalid=True)
    assert info.value.location == f"{p}:3" and info.value.field == "<json>"


# ---- parquet --------------------------------------------------------------------------


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"id": "a", "domain": "math", "prompt": "1+1?", "answer": "2", "tests": None, "meta": {"src": "x"}},
        {"id": "b", "domain": "code", "prompt": "f?", "answer": None, "tests": "assert f()", "meta": {"src": None}},
        {"id": "c", "domain": "math", "prompt": "", "answer": "0", "tests": None, "meta": None},
    ]
    p = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist(rows), p)
    with pytest.raises(RecordError) as info:
        load_records(p)
    assert info.value.location == f"{p} row 2" and info.value.field == "prompt"
    res = load_records(p, skip_invalid=True)
    a, b = res.records
    assert (a.answer, a.tests, a.meta) == ("2", None, {"src": "x"})
    assert (b.answer, b.tests) == (None, "assert f()")
    assert [s.location for s in res.skipped] == [f"{p} row 2"]


def test_parquet_messages_with_struct_nulls(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # arrow stores the parts as one struct type, so each part gets every key (None where unused)
    parts = [{"type": "image", "image": "img.png"}, {"type": "text", "text": "color?"}]
    rows = [{"question": "q1", "sol": "1", "msgs": [{"role": "user", "content": parts}]}]
    p = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows), p)
    assert pq.read_table(p).to_pylist()[0]["msgs"][0]["content"][0]["text"] is None
    res = load_records(
        p,
        field_map={"question": "teacher_prompt", "sol": "answer", "msgs": "prompt"},
        default_domain="d",
        generate_ids=True,
        check_images=False,
    )
    r = res.records[0]
    expected = [{"type": "image", "image": str(tmp_path / "img.png")}, {"type": "text", "text": "color?"}]
    assert (r.id, r.prompt, r.teacher_prompt) == ("m-0", [{"role": "user", "content": expected}], "q1")


def test_not_a_parquet_file(tmp_path):
    p = tmp_path / "t.parquet"
    p.write_text("nope")
    with pytest.raises(ValueError, match="cannot read parquet"):
        load_records(p)


# ---- datasets -------------------------------------------------------------------------


def test_datasets_dir(tmp_path):
    import datasets

    rows = [{"question": f"{i}+1?", "answer": i + 1, "subject": "algebra"} for i in range(4)]
    rows[2]["question"] = " "
    d = tmp_path / "my_set"
    datasets.Dataset.from_list(rows).save_to_disk(str(d))
    fm = {"question": "prompt", "subject": "meta.subject"}
    res = load_records(d, field_map=fm, default_domain="math", generate_ids=True, skip_invalid=True)
    assert [r.id for r in res.records] == ["my_set-0", "my_set-1", "my_set-3"]
    assert res.records[1].answer == "2" and res.records[1].meta == {"subject": "algebra"}
    assert res.skipped == [SkippedRecord(f"{d} row 2", "prompt", "must not be empty")]


def test_datasets_dict_splits(tmp_path):
    import datasets

    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_list([rec(0), rec(1)]),
        test=datasets.Dataset.from_list([rec(5)]),
    )
    d = tmp_path / "dd"
    dd.save_to_disk(str(d))
    assert [r.id for r in load_records(d).records] == ["r0", "r1"]
    assert [r.id for r in load_records(d, split="test").records] == ["r5"]
    with pytest.raises(ValueError, match="no split 'dev'"):
        load_records(d, split="dev")


def test_datasets_image_column(tmp_path):
    import datasets
    from PIL import Image

    rows = [{"id": "v0", "domain": "vqa", "prompt": "color?", "answer": "red", "image": Image.new("RGB", (4, 4), (255, 0, 0))}]
    ds = datasets.Dataset.from_list(rows, features=datasets.Features(
        {"id": datasets.Value("string"), "domain": datasets.Value("string"), "prompt": datasets.Value("string"),
         "answer": datasets.Value("string"), "image": datasets.Image()}))
    d = tmp_path / "vqa"
    ds.save_to_disk(str(d))
    res = load_records(d, field_map={"image": "images"})
    (r,) = res.records
    assert len(r.images) == 1 and r.images[0].startswith("data:image/png;base64,")
    from uniopd.data.images import load_image

    assert load_image(r.images[0]).getpixel((0, 0)) == (255, 0, 0)


def test_hf_spec_uses_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split=None, **kw):
        calls.append((name, split))
        return datasets.Dataset.from_list([{"problem": "1+1?", "answer": "2"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    res = load_records("hf:org/gsm:test", field_map={"problem": "prompt"}, default_domain="math", generate_ids=True)
    assert calls == [("org/gsm", "test")]
    assert res.records[0].id == "gsm-0" and res.source == "hf:org/gsm:test"
    load_records("hf:org/gsm", field_map={"problem": "prompt"}, default_domain="math", generate_ids=True)
    assert calls[-1] == ("org/gsm", "train")


def test_hf_load_failure_is_value_error(monkeypatch):
    import datasets

    def boom(name, split=None, **kw):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(ValueError, match="offline"):
        load_records("hf:nothing")


# ---- write_records --------------------------------------------------------------------


def test_write_roundtrip(tmp_path):
    recs = [
        PromptRecord(id="a", domain="math", prompt="ü 1+1?", answer="2", meta={"k": [1]}),
        PromptRecord(id="b", domain="code", prompt=[{"role": "user", "content": "f"}], tests=["assert f()"]),
    ]
    out = write_records(tmp_path / "sub" / "out.jsonl", recs)
    assert out.read_text(encoding="utf-8").count("\n") == 2 and "ü" in out.read_text(encoding="utf-8")
    assert load_records(out).records == recs
    gz = write_records(tmp_path / "out.jsonl.gz", recs + [{"id": "c", "domain": "m", "prompt": "p", "answer": 1}])
    assert [r.id for r in load_records(gz).records] == ["a", "b", "c"]


def test_write_is_atomic(tmp_path):
    p = write_records(tmp_path / "o.jsonl", [PromptRecord(id="a", domain="m", prompt="p", answer="1")])
    before = p.read_text()

    def bad():
        yield PromptRecord(id="b", domain="m", prompt="p", answer="1")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_records(p, bad())
    assert p.read_text() == before
    assert os.listdir(tmp_path) == ["o.jsonl"]  # no temporary file left behind
