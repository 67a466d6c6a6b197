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


