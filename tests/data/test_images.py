"""Image references: paths, data URIs, checks in records, and `load_image`."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from uniopd.data.images import (
    check_image,
    decode_data_uri,
    image_to_data_uri,
    is_remote_url,
    load_image,
    resolve_image_path,
)
from uniopd.data.loader import load_records
from uniopd.data.validate import RecordError, record_from_obj


def png_bytes(size=(8, 6), color=(255, 0, 0), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 128).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.fixture
def img_dir(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "red.png").write_bytes(png_bytes())
    (tmp_path / "img" / "gray.png").write_bytes(png_bytes(mode="L"))
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    (tmp_path / "img" / "text.png").write_bytes(b"hello")
    good = png_bytes((16, 16))
    (tmp_path / "img" / "truncated.png").write_bytes(good[: len(good) // 2])
    return tmp_path


# ---- refs -----------------------------------------------------------------------------


def test_resolve(tmp_path):
    assert resolve_image_path("a.png", tmp_path) == tmp_path / "a.png"
    assert resolve_image_path("/x/a.png", tmp_path).as_posix() == "/x/a.png"
    assert resolve_image_path("file:///x/a.png", tmp_path).as_posix() == "/x/a.png"


def test_remote_detection():
    assert is_remote_url("https://x/a.png") and is_remote_url("s3://b/k")
    assert not is_remote_url("file:///a.png") and not is_remote_url("img/a.png")


def test_decode_data_uri():
    assert decode_data_uri(data_uri(b"abc")) == b"abc"
    assert decode_data_uri("data:image/png;base64,YW\nJj") == b"abc"
    with pytest.raises(ValueError, match="base64"):
        decode_data_uri("data:image/png,abc")
    with pytest.raises(ValueError, match="invalid base64"):
        decode_data_uri("data:image/png;base64,@@@")
    with pytest.raises(ValueError, match="malformed"):
        decode_data_uri("data:image/png;base64")
    with pytest.raises(ValueError, match="empty"):
        decode_data_uri("data:image/png;base64,")


# ---- check_image ----------------------------------------------------------------------


def test_check_ok(img_dir):
    check_image("img/red.png", img_dir)
    check_image(str(img_dir / "img" / "red.png"))
    check_image(data_uri(png_bytes()))


@pytest.mark.parametrize(
    "ref,exc,frag",
    [
        ("img/missing.png", FileNotFoundError, "file not found"),
        ("img/corrupt.png", ValueError, "not a readable image"),
        ("img/text.png", ValueError, "not a readable image"),
        ("img", ValueError, "directory"),
        ("https://example.com/a.png", ValueError, "remote"),
        ("data:image/png;base64,aGVsbG8=", ValueError, "not a readable image"),
        ("img/\x00bad.png", ValueError, "cannot read"),
    ],
)
def test_check_bad(img_dir, ref, exc, frag):
    with pytest.raises(exc, match=frag):
        check_image(ref, img_dir)


# ---- in records -----------------------------------------------------------------------


def rec(images=(), prompt="What color?"):
    return {"id": "a", "domain": "vqa", "prompt": prompt, "answer": "red", "images": list(images)}


def test_record_images_checked_ok(img_dir):
    r = record_from_obj(rec(["img/red.png", data_uri(png_bytes())]), location="f.jsonl:1", base_dir=img_dir, check_images=True)
    assert r.images[0] == str(img_dir / "img" / "red.png")


@pytest.mark.parametrize(
    "ref,frag",
    [
        ("img/missing.png", "file not found"),
        ("img/corrupt.png", "not a readable image"),
        ("data:image/png;base64,aGVsbG8=", "not a readable image"),
        ("data:image/png;base64,!!", "invalid base64"),
    ],
)
def test_record_image_error_names_location_index_path(img_dir, ref, frag):
    with pytest.raises(RecordError) as info:
        record_from_obj(rec(["img/red.png", ref]), location="f.jsonl:7", base_dir=img_dir, check_images=True)
    e = info.value
    assert e.location == "f.jsonl:7" and e.field == "images[1]"
    s = str(e)
    assert "f.jsonl:7" in s and "image 1" in s and ref[:40] in s and frag in s


def test_missing_image_error_shows_resolved_path(img_dir):
    with pytest.raises(RecordError) as info:
        record_from_obj(rec(["img/missing.png"]), location="f.jsonl:1", base_dir=img_dir, check_images=True)
    assert str(img_dir / "img" / "missing.png") in str(info.value)


def test_record_images_unchecked(img_dir):
    r = record_from_obj(rec(["img/missing.png"]), location="f.jsonl:1", base_dir=img_dir, check_images=False)
    assert r.images == [str(img_dir / "img" / "missing.png")]


def test_message_image_parts_checked(img_dir):
    prompt = [
        {
            "role": "user",
            "content": [{"type": "image", "image": "img/red.png"}, {"type": "text", "text": "Color?"}],
        }
    ]
    r = record_from_obj(rec(prompt=prompt), location="f.jsonl:1", base_dir=img_dir, check_images=True)
    assert r.prompt[0]["content"][0]["image"] == str(img_dir / "img" / "red.png")
    prompt[0]["content"][0] = {"type": "image", "url": "img/missing.png"}
    with pytest.raises(RecordError) as info:
        record_from_obj(rec(prompt=prompt), location="f.jsonl:1", base_dir=img_dir, check_images=True)
    assert info.value.field == "prompt[0].content[0].url"
    assert "img/missing.png" in str(info.value)


def test_loader_checks_images_relative_to_file(img_dir, tmp_path):
    sub = img_dir / "sets"
    sub.mkdir()
    (sub / "img").mkdir()
    (sub / "img" / "x.png").write_bytes(png_bytes())
    lines = [rec(["img/x.png"]), {**rec(["img/red.png"]), "id": "b"}]  # second is relative to the wrong dir
    path = sub / "vqa.jsonl"
    path.write_text("\n".join(json.dumps(o) for o in lines) + "\n")
    with pytest.raises(RecordError) as info:
        load_records(path)
    assert info.value.location == f"{path}:2" and info.value.field == "images[0]"
    res = load_records(path, skip_invalid=True)
    assert [r.id for r in res.records] == ["a"] and res.skipped[0].field == "images[0]"
    res = load_records(path, check_images=False)
    assert len(res.records) == 2


# ---- load_image -----------------------------------------------------------------------


def test_load_image_path_rgb(img_dir):
    im = load_image("img/gray.png", img_dir)
    assert im.mode == "RGB" and im.size == (8, 6)
    im = load_image(str(img_dir / "img" / "red.png"))
    assert im.getpixel((0, 0)) == (255, 0, 0)


def test_load_image_data_uri_and_pil():
    im = load_image(data_uri(png_bytes((3, 4), (0, 255, 0))))
    assert im.size == (3, 4) and im.getpixel((1, 1)) == (0, 255, 0)
    assert load_image(Image.new("RGBA", (2, 2))).mode == "RGB"


def test_load_image_errors(img_dir):
    with pytest.raises(FileNotFoundError):
        load_image("img/missing.png", img_dir)
    with pytest.raises(ValueError, match="cannot decode"):
        load_image("img/truncated.png", img_dir)
    with pytest.raises(ValueError, match="remote"):
        load_image("http://example.com/a.png")


def test_image_to_data_uri_roundtrip(img_dir):
    im = Image.new("RGB", (5, 5), (1, 2, 3))
    uri = image_to_data_uri(im)
    assert uri.startswith("data:image/png;base64,")
    assert load_image(uri).getpixel((2, 2)) == (1, 2, 3)
    raw = (img_dir / "img" / "red.png").read_bytes()
    assert decode_data_uri(image_to_data_uri(raw)) == raw
    assert decode_data_uri(image_to_data_uri({"bytes": None, "path": str(img_dir / "img" / "red.png")})) == raw
    with pytest.raises(ValueError):
        image_to_data_uri(b"not an image")
    with pytest.raises(TypeError):
        image_to_data_uri(3)
