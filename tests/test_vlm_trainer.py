"""End to end: a vision-language student trained by OPD with a VLM teacher and with a text teacher (cross-modal)."""

import json
import math

import pytest
from helpers import tiny_run_config, write_jsonl

from uniopd.config import ConfigError, ModelConfig
from uniopd.models.loading import load_model
from uniopd.models.multimodal import ImageInputError
from uniopd.train.trainer import Trainer


def _train(cfg):
    trainer = Trainer(cfg)
    result = trainer.train()
    rows = [json.loads(line) for line in open(result["metrics_path"])]
    assert len(rows) == cfg.trainer.steps
    for row in rows:
        assert math.isfinite(row["loss"]) and math.isfinite(row["teacher_kl"]), row
    return trainer, rows


def test_vlm_student_with_vlm_teacher(tiny_vlm_dir, tiny_vlm_teacher_dir, vqa_file, tmp_path):
    cfg = tiny_run_config(tiny_vlm_dir, tiny_vlm_teacher_dir, vqa_file, tmp_path / "run",
                          **{"loss.kind": "topk", "loss.topk": 4})
    trainer, rows = _train(cfg)
    assert trainer.student.is_multimodal and trainer.teachers["t"].loaded.is_multimodal
    assert all(row["update/rows"] > 0 for row in rows)
    # the checkpoint is a loadable VLM (processor saved with it)
    back = load_model(ModelConfig(path=str(tmp_path / "run" / "checkpoints" / "step_000002")), trainable=False)
    assert back.is_multimodal


def test_vlm_student_with_text_teacher_reading_image_text(tiny_vlm_dir, tiny_text_teacher_for_vlm_dir, vqa_file,
                                                          tmp_path):
    cfg = tiny_run_config(tiny_vlm_dir, tiny_text_teacher_for_vlm_dir, vqa_file, tmp_path / "run",
                          **{"teachers.t.view": "image_text"})
    trainer, _ = _train(cfg)
    teacher = trainer.teachers["t"]
    assert not teacher.loaded.is_multimodal
    text = teacher.loaded.tokenizer.decode(teacher.prompt_ids(trainer.records[0])).replace(" ", "")
    assert "[image:aredsquareonawhitebackground]Whatcolor" in text  # (this decode drops whitespace)
    assert "<|image_pad|>" not in text


def test_image_text_view_needs_the_field(tiny_vlm_dir, tiny_text_teacher_for_vlm_dir, tmp_path, color_images):
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "x", "domain": "vqa", "prompt": "Color?", "answer": "red",
                                              "images": [str(color_images["red"])]}])
    cfg = tiny_run_config(tiny_vlm_dir, tiny_text_teacher_for_vlm_dir, data, tmp_path / "run",
                          **{"teachers.t.view": "image_text"})
    with pytest.raises(ConfigError, match="record 'x'.*image_text"):
        Trainer(cfg)


def test_unreadable_image_names_the_record(tiny_vlm_dir, tiny_vlm_teacher_dir, tmp_path, color_images):
    from uniopd.data.records import PromptRecord

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    records = [PromptRecord("good", "vqa", "Color?", answer="red", images=[str(color_images["red"])]),
               PromptRecord("broken-7", "vqa", "Color?", answer="red", images=[str(bad)])]
    cfg = tiny_run_config(tiny_vlm_dir, tiny_vlm_teacher_dir, tmp_path / "unused.jsonl", tmp_path / "run")
    with pytest.raises(ImageInputError, match="record 'broken-7'.*broken.png"):
        Trainer(cfg, records=records)
