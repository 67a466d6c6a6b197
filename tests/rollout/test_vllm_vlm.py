"""The vLLM rollout engine with a vision-language student, for real on vllm-cpu (`pytest -m vllm`).

The student is a tiny Idefics3 (SmolVLM's architecture): vLLM's Qwen-VL models import
torchvision, which has no CPU build, so they cannot run here. vLLM is given each image
prompt's rendered text and images and expands the placeholders with the checkpoint's own
processor; the checks: the expanded prompt is the trainer's, placeholders are never sampled,
the engine's log-probs equal the trainer's forward with the same pixels within 1e-3, before
and after a weight update that reaches the vision tower too; and three training steps, each
sampled from that step's weights.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of RAM for the KV cache on CPU
pytest.importorskip("vllm")

from helpers import tiny_run_config  # noqa: E402

from uniopd.config import ModelConfig, RolloutConfig  # noqa: E402
from uniopd.data.records import PromptRecord  # noqa: E402
from uniopd.models.forward import build_layout, response_logprobs  # noqa: E402
from uniopd.models.loading import load_model  # noqa: E402
from uniopd.models.multimodal import StudentVision, layout_inputs  # noqa: E402
from uniopd.demo.vlm import make_tiny_idefics3  # noqa: E402
from uniopd.rollout.base import build_rollout_engine  # noqa: E402
from uniopd.train.trainer import Trainer  # noqa: E402

pytestmark = pytest.mark.vllm


def _trainer_logprobs(loaded, vision, records, groups) -> torch.Tensor:
    flat = [(r, s) for r, g in zip(records, groups) for s in g]
    prompts = [s.prompt_ids for _, s in flat]
    layout = build_layout(prompts, [s.response_ids for _, s in flat], loaded.tokenizer.pad_token_id)
    extra = layout_inputs(loaded.model, layout, vision.inputs([r for r, _ in flat]), [len(p) for p in prompts])
    with torch.no_grad():
        logp_N, _ = response_logprobs(loaded.model.eval(), layout, extra_inputs=extra,
                                      suppress_ids=vision.suppress_ids)
    return logp_N


def _engine_logprobs(groups) -> torch.Tensor:
    return torch.tensor([x for g in groups for s in g for x in s.logprobs])


def test_image_prompts_sample_with_the_trainers_pixels_and_follow_weight_updates(tiny_idefics3_dir, color_images):
    loaded = load_model(ModelConfig(path=str(tiny_idefics3_dir)), trainable=True)
    vision = StudentVision.of(loaded, ModelConfig())
    engine = build_rollout_engine(RolloutConfig(backend="vllm", max_new_tokens=10), loaded,
                                  suppress_ids=vision.suppress_ids)
    records = [PromptRecord("a", "vqa", "What color?", images=[str(color_images["red"])]),
               PromptRecord("b", "vqa", "What color?", images=[str(color_images["blue"])]),
               PromptRecord("c", "vqa", "No image here, just text.")]  # a text row beside image rows
    prompts = [vision.ids(r) for r in records]
    assert prompts[0].count(loaded.processor.tokenizer.convert_tokens_to_ids("<image>")) == 4  # expanded
    try:
        def sample(seed):
            return engine.sample(prompts, 2, multimodal=vision.inputs(records),
                                 generator=torch.Generator().manual_seed(seed))

        groups = sample(0)
        responses = [s.response_ids for g in groups for s in g]
        assert [g[0].prompt_ids for g in groups] == prompts and sum(map(len, responses)) > 20
        assert not set(vision.suppress_ids) & {t for r in responses for t in r}  # placeholders never sampled
        diff = (_engine_logprobs(groups) - _trainer_logprobs(loaded, vision, records, groups)).abs().max()
        assert diff < 1e-3, diff

        # The image reaches the engine: the same prompt text with another image samples differently.
        assert [s.response_ids for s in groups[0]] != [s.response_ids for s in groups[1]]

        # A weight change, vision tower included, reaches the engine only through update_weights.
        with torch.no_grad():
            for p in loaded.model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        stale = sample(1)
        assert (_engine_logprobs(stale) - _trainer_logprobs(loaded, vision, records, stale)).abs().max() > 1e-2
        engine.update_weights(loaded.model)
        fresh = sample(1)
        diff = (_engine_logprobs(fresh) - _trainer_logprobs(loaded, vision, records, fresh)).abs().max()
        assert diff < 1e-3, diff
    finally:
        engine.close()


def test_training_a_vision_language_student_with_vllm_rollouts(tiny_idefics3_dir, vqa_file, tmp_path):
    teacher = make_tiny_idefics3(tmp_path / "teacher", seed=2)
    cfg = tiny_run_config(tiny_idefics3_dir, teacher, vqa_file, tmp_path / "run",
                          **{"rollout.backend": "vllm", "trainer.steps": 3, "trainer.lr": 3e-3,
                             "rollout.max_new_tokens": 8})
    result = Trainer(cfg).train()
    rows = [json.loads(line) for line in open(result["metrics_path"])]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["update/rows"] == 8 for r in rows)
    # Every step sampled from that step's weights, the vision tower's included.
    assert all(r["rollout/logprob_diff_max"] < 1e-3 for r in rows), [r["rollout/logprob_diff_max"] for r in rows]
    assert rows[-1]["teacher_kl"] != rows[0]["teacher_kl"]


def test_a_vision_language_model_vllm_cannot_load_here_is_refused_at_start_naming_why(tiny_vlm_dir):
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: vLLM loads Qwen2-VL")
    loaded = load_model(ModelConfig(path=str(tiny_vlm_dir)), trainable=True)
    vision = StudentVision.of(loaded, ModelConfig())
    with pytest.raises(RuntimeError, match=r"(?s)rollout.backend=vllm: vLLM could not start an engine for .*"
                                           r"import torchvision, which is not installed here"):
        build_rollout_engine(RolloutConfig(backend="vllm"), loaded, suppress_ids=vision.suppress_ids)
