"""Shared fixtures: tiny random Llama students/teachers saved with save_pretrained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import make_tiny_model, write_jsonl

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("student"), layers=2, hidden=32, seed=1)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("teacher"), layers=2, hidden=48, seed=2)


@pytest.fixture
def arithmetic_file(tmp_path) -> Path:
    rows = [{"id": f"p{i}", "domain": "arithmetic", "prompt": f"{i}+{i + 1}=", "answer": str(2 * i + 1),
             "verifier": "exact"} for i in range(12)]
    return write_jsonl(tmp_path / "train.jsonl", rows)




# ---- vision-language fixtures: tiny random Qwen2-VL checkpoints + images on disk -----------


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory) -> Path:
    from uniopd.demo.vlm import make_tiny_vlm

    return make_tiny_vlm(tmp_path_factory.mktemp("vlm_student"), hidden=32, seed=1)


@pytest.fixture(scope="session")
def tiny_vlm_teacher_dir(tmp_path_factory) -> Path:
    from uniopd.demo.vlm import make_tiny_vlm

    return make_tiny_vlm(tmp_path_factory.mktemp("vlm_teacher"), hidden=48, seed=2)


@pytest.fixture(scope="session")
def tiny_text_teacher_for_vlm_dir(tmp_path_factory) -> Path:
    """Text-only model sharing the tiny VLM's tokenizer (cross-modal teacher)."""
    from uniopd.demo.vlm import make_tiny_text_teacher

    return make_tiny_text_teacher(tmp_path_factory.mktemp("text_teacher"), hidden=48, seed=3)


@pytest.fixture(scope="session")
def color_images(tmp_path_factory) -> dict[str, Path]:
    """64x64 PNGs: a red, a blue and a green square on white (easy-vqa sized)."""
    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("images")
    out = {}
    for name, rgb in (("red", (255, 0, 0)), ("blue", (0, 0, 255)), ("green", (0, 255, 0))):
        img = Image.new("RGB", (64, 64), (255, 255, 255))
        ImageDraw.Draw(img).rectangle((12, 12, 52, 52), fill=rgb)
        out[name] = root / f"{name}.png"
        img.save(out[name])
    return out


@pytest.fixture(scope="session")
def tiny_idefics3_dir(tmp_path_factory) -> Path:
    """A tiny Idefics3 (SmolVLM's architecture): the vision-language student vLLM runs on CPU."""
    from uniopd.demo.vlm import make_tiny_idefics3

    return make_tiny_idefics3(tmp_path_factory.mktemp("idefics3_student"), seed=1)


@pytest.fixture
def vqa_file(tmp_path, color_images) -> Path:
    """Four easy-vqa-style records: a coloured square, its colour as the answer and as image_text."""
    rows = []
    for i, color in enumerate(["red", "blue", "green", "red"]):
        rows.append({"id": f"v{i}", "domain": "vqa", "prompt": "What color is the square?",
                     "images": [str(color_images[color])], "answer": color, "verifier": "exact",
                     "image_text": f"a {color} square on a white background"})
    return write_jsonl(tmp_path / "vqa.jsonl", rows)
