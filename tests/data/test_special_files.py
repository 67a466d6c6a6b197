"""Prompt files and images that are not what they claim: FIFOs, devices, 10 GB sparse files, fake gzip,
runaway lines, and prompts far past max_prompt_tokens. Each fails fast (or follows data.overlong) with
a message naming the path (and key, field or file:line), without reading the whole thing."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import deadline, write_jsonl

import uniopd
from uniopd.config import load_config
from uniopd.data import loader
from uniopd.data.loader import load_records
from uniopd.data.prompts import (
    CHARS_PER_TOKEN,
    PromptTooLong,
    load_prompt_records,
    prepare_prompts,
)
from uniopd.data.records import PromptRecord
from uniopd.data.validate import RecordError
from uniopd.demo.tokenizer import char_tokenizer
from uniopd.models.prompts import render_prompt


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _dev_zero(path: Path) -> Path:
    path.symlink_to("/dev/zero")
    return path


def _sparse(path: Path) -> Path:
    with open(path, "wb") as fh:
        fh.truncate(10 << 30)  # 10 GB of holes: no disk used
    return path


SPECIAL = {"fifo": (_fifo, "is a FIFO"), "dev_zero": (_dev_zero, "is a character device"),
           "sparse_10GB": (_sparse, "10.0 GB, over the")}


@pytest.mark.parametrize("name", ["train.jsonl", "train.json", "train.jsonl.gz", "train.parquet"])
@pytest.mark.parametrize("kind", sorted(SPECIAL))
def test_special_and_huge_prompt_files_fail_fast_naming_key_and_path(tmp_path, kind, name):
    make, message = SPECIAL[kind]
    path = make(tmp_path / name)
    cfg = load_config(None, [f"data.train={path}"])
    with deadline(30), pytest.raises(ValueError, match=f"data.train: prompt file {path}: {message}"):
        load_prompt_records(cfg.data, cfg.data.train)


def test_the_data_limit_can_be_raised(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "t.jsonl", [{"id": "a", "domain": "d", "prompt": "p", "answer": "1"}])
    monkeypatch.setenv("UNIOPD_MAX_DATA_BYTES", "10")
    with pytest.raises(ValueError, match="over the 10 bytes limit for data files"):
        load_records(path)
    monkeypatch.setenv("UNIOPD_MAX_DATA_BYTES", "1000")
    assert len(load_records(path)) == 1


@pytest.mark.parametrize("name", ["train.jsonl.gz", "train.json.gz"])
def test_a_gz_file_that_is_not_gzip_is_a_value_error_naming_it(tmp_path, name):
    path = tmp_path / name
    path.write_text('{"id": "a", "domain": "d", "prompt": "p", "answer": "1"}\n')
    with pytest.raises(ValueError, match=f"{path}: not a valid gzip file"):
        load_records(path)
    path.write_bytes(gzip.compress(path.read_bytes())[:-12])  # truncated gzip
    with pytest.raises(ValueError, match=f"{path}: not a valid gzip file"):
        load_records(path)


def test_a_runaway_line_is_one_invalid_record_not_a_memory_blowup(tmp_path, monkeypatch):
    monkeypatch.setattr(loader, "MAX_LINE_BYTES", 1000)
    path = tmp_path / "t.jsonl.gz"
    rows = [{"id": "a", "domain": "d", "prompt": "x" * 5000, "answer": "1"},
            {"id": "b", "domain": "d", "prompt": "p", "answer": "1"}]
    with gzip.open(path, "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RecordError, match=r"t.jsonl.gz:1: line longer than 1000 bytes"):
        load_records(path)
    result = load_records(path, skip_invalid=True)
    assert [r.id for r in result] == ["b"] and result.skipped[0].location.endswith(":1")


@pytest.mark.parametrize("kind", sorted(SPECIAL))
def test_special_and_huge_images_fail_fast_naming_field_and_path(tmp_path, kind):
    make, message = SPECIAL[kind]
    image = make(tmp_path / "cat.png")
    data = write_jsonl(tmp_path / "t.jsonl", [{"id": "a", "domain": "d", "prompt": "what?", "answer": "cat",
                                               "images": ["cat.png"]}])
    with deadline(30), pytest.raises(RecordError) as info:
        load_records(data)
    msg = str(info.value)
    assert "t.jsonl:1" in msg and "images[0]" in msg and f"image {image}: {message}" in msg


def test_special_image_given_as_a_datasets_cell_path(tmp_path):
    from uniopd.data.images import image_to_data_uri

    fifo = _fifo(tmp_path / "x.png")
    with deadline(30), pytest.raises(ValueError, match=f"image {fifo}: is a FIFO"):
        image_to_data_uri({"bytes": None, "path": str(fifo)})


# ----------------------------------------------------------------------------- prompts past the limit


def _cfg(policy: str, limit: int = 10):
    return load_config(None, [f"model.max_prompt_tokens={limit}", f"data.overlong={policy}"])


def _huge(tmp_path, chars: int) -> list[PromptRecord]:
    rows = [{"id": "ok", "domain": "d", "prompt": "1+1=", "answer": "2"},
            {"id": "huge", "domain": "d", "prompt": "7" * chars + "+1=", "answer": "8"}]
    return load_records(write_jsonl(tmp_path / "t.jsonl", rows)).records


def test_a_prompt_past_the_character_bound_errors_naming_file_line_and_record(tmp_path):
    cfg = _cfg("error")
    with pytest.raises(PromptTooLong, match=r"t.jsonl:2: record 'huge': prompt has 1003 characters"):
        prepare_prompts(_huge(tmp_path, 1000), char_tokenizer(), cfg.model, cfg.data)


def test_skip_drops_it_untokenised_and_counts_it(tmp_path, monkeypatch):
    cfg = _cfg("skip")
    seen = []
    tok = char_tokenizer()
    monkeypatch.setattr("uniopd.data.prompts.render_prompt",
                        lambda t, p, **kw: seen.append(len(p)) or render_prompt(t, p, **kw))
    kept, ids, stats = prepare_prompts(_huge(tmp_path, 1000), tok, cfg.model, cfg.data)
    assert [r.id for r in kept] == ["ok"] and stats == {"truncated": 0, "skipped_overlong": 1}
    assert seen == [4]  # the huge prompt never reached the tokenizer


def test_truncate_cuts_characters_first_and_keeps_the_same_last_tokens(tmp_path):
    cfg = _cfg("truncate")
    tok = char_tokenizer()
    records = _huge(tmp_path, 1000)
    kept, ids, stats = prepare_prompts(records, tok, cfg.model, cfg.data)
    assert [r.id for r in kept] == ["ok", "huge"] and stats == {"truncated": 1, "skipped_overlong": 0}
    assert ids[1] == render_prompt(tok, records[1].prompt)[-10:]  # what cutting tokens alone gives
    assert len(kept[1].prompt) == CHARS_PER_TOKEN * 10  # teachers see the cut prompt, never the whole


def test_truncate_cuts_message_lists_from_their_start():
    from uniopd.data.prompts import _keep_last_chars

    prompt = [{"role": "system", "content": "s" * 10},
              {"role": "user", "content": [{"type": "text", "text": "a" * 10}, {"type": "image", "image": "x"},
                                           {"type": "text", "text": "b" * 10}]}]
    cut = _keep_last_chars(prompt, 15)
    assert cut[0] == {"role": "system", "content": ""}
    assert cut[1]["content"] == [{"type": "text", "text": "a" * 5}, {"type": "image", "image": "x"},
                                 {"type": "text", "text": "b" * 10}]


_MEASURE = """
import json, resource, sys, time
from uniopd.config import load_config
from uniopd.data.prompts import load_prompt_records, prepare_prompts
from uniopd.demo.tokenizer import char_tokenizer
data, policy = sys.argv[1], sys.argv[2]
cfg = load_config(None, [f"data.train={data}", f"data.overlong={policy}", "model.max_prompt_tokens=1024"])
tok = char_tokenizer()
tok("warm up")
before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()
out = {}
try:
    kept, ids, stats = prepare_prompts(load_prompt_records(cfg.data, cfg.data.train), tok, cfg.model, cfg.data)
    out["stats"], out["lengths"] = stats, [len(i) for i in ids]
except ValueError as exc:
    out["error"] = str(exc)
out["grew_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
out["seconds"] = time.monotonic() - start
print(json.dumps(out))
"""


@pytest.mark.parametrize("policy", ["error", "truncate", "skip"])
def test_a_10mb_prompt_is_handled_fast_in_little_memory(tmp_path, policy):
    data = write_jsonl(tmp_path / "big.jsonl", [{"id": "ok", "domain": "d", "prompt": "1+1=", "answer": "2"},
                                                 {"id": "huge", "domain": "d", "prompt": "1+2=" * (10 << 18),
                                                  "answer": "3"}])
    src = str(Path(uniopd.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(data), policy], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["grew_mb"] < 500 and out["seconds"] < 30, out
    if policy == "error":
        assert "big.jsonl:2: record 'huge': prompt has 10485760 characters" in out["error"]
    elif policy == "truncate":
        assert out["stats"] == {"truncated": 1, "skipped_overlong": 0} and out["lengths"][1] == 1024
    else:
        assert out["stats"] == {"truncated": 0, "skipped_overlong": 1} and out["lengths"] == [out["lengths"][0]]
