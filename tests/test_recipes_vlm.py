"""Smoke tests of the VLM and cross-modal recipes through the CLI, on tiny random models."""

import json
from pathlib import Path

import pytest

from uniopd.cli import main
from uniopd.config import load_config
from uniopd.data import load_records

ROOT = Path(__file__).resolve().parent.parent
EASYVQA = ROOT / "recipes" / "data" / "easyvqa" / "train.jsonl"


def _smoke(recipe: str, teacher_paths: dict[str, Path], student: Path, out: Path, *extra: str) -> list[dict]:
    overrides = [f"model.path={student}", "model.dtype=float32", f"data.train={EASYVQA}",
                 "rollout.prompts_per_step=6", "rollout.n=2", "rollout.max_new_tokens=4", "balance.oversample=1.0",
                 "trainer.steps=2", "trainer.micro_batch_size=12", f"trainer.output_dir={out}",
                 "logging.progress=false", "logging.tensorboard=false", *extra]
    for name, path in teacher_paths.items():
        overrides += [f"teachers.{name}.path={path}", f"teachers.{name}.dtype=float32"]
    assert main(["train", "-c", str(ROOT / "recipes" / recipe), *overrides]) == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(rows) == 2
    return rows


def test_vlm_single_teacher_recipe(tiny_vlm_dir, tiny_vlm_teacher_dir, tmp_path):
    _smoke("vlm_single_teacher.yaml", {"vlm": tiny_vlm_teacher_dir}, tiny_vlm_dir, tmp_path / "run")


def test_vlm_multi_teacher_recipe_routes_by_domain(tiny_vlm_dir, tiny_vlm_teacher_dir, tmp_path):
    cfg = load_config(ROOT / "recipes" / "vlm_multi_teacher.yaml")
    assert {n: t.domains for n, t in cfg.teachers.items()} == {"color": ["vqa_color"], "shape": ["vqa_shape"]}
    rows = _smoke("vlm_multi_teacher.yaml", {"color": tiny_vlm_teacher_dir, "shape": tiny_vlm_dir}, tiny_vlm_dir,
                  tmp_path / "run")
    keys = {k for row in rows for k in row}
    assert {"domain/vqa_color/acc", "domain/vqa_shape/acc"} <= keys
    assert {"teacher/color/teacher_kl", "teacher/shape/teacher_kl"} <= keys


def test_cross_modal_recipe(tiny_vlm_dir, tiny_text_teacher_for_vlm_dir, tmp_path):
    cfg = load_config(ROOT / "recipes" / "cross_modal_easyvqa.yaml")
    assert cfg.teachers["text"].view == "image_text"
    _smoke("cross_modal_easyvqa.yaml", {"text": tiny_text_teacher_for_vlm_dir}, tiny_vlm_dir, tmp_path / "run")


def test_shipped_easyvqa_records_are_valid():
    records = load_records(EASYVQA).records  # opens and verifies every image
    assert len(records) > 300 and all(r.images and r.image_text for r in records)
    assert {r.domain for r in records} == {"vqa_color", "vqa_shape"}


@pytest.mark.parametrize("question,answer,facts", [
    ("what is the blue shape?", "rectangle", {"shape": "rectangle", "color": "blue"}),
    ("what color is the triangle?", "red", {"color": "red", "shape": "triangle"}),
    ("does the image not contain a circle?", "no", {"shape": "circle"}),
    ("is no gray shape present?", "yes", {}),
    ("is there a teal shape?", "yes", {"color": "teal"}),
    ("is there a teal shape?", "no", {}),
])
def test_facts_from_questions(question, answer, facts):
    from uniopd.data.easyvqa import facts_from_question

    assert facts_from_question(question, answer) == facts


def test_prepare_easyvqa_cli(tmp_path):
    pytest.importorskip("easy_vqa")
    assert main(["prepare", "easyvqa", "--out", str(tmp_path), "--split", "test", "--limit-images", "2"]) == 0
    records = load_records(tmp_path / "test.jsonl").records
    assert records and len(list((tmp_path / "images").glob("*.png"))) == 2
    assert all(r.image_text.startswith("a ") and r.verifier == "exact" for r in records)
