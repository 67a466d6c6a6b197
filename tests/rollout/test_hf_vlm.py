"""Rollout of a vision-language student (Qwen2-VL, Idefics3): images in the prefill, M-RoPE
positions, placeholders never sampled."""

import pytest
import torch

from uniopd.config import ModelConfig, RolloutConfig
from uniopd.data.records import PromptRecord
from uniopd.models.forward import build_layout, response_logprobs
from uniopd.models.loading import load_model
from uniopd.models.multimodal import StudentVision, layout_inputs
from uniopd.rollout.hf import generate


@pytest.fixture(scope="module", params=["tiny_vlm_dir", "tiny_idefics3_dir"])
def vlm(request):
    loaded = load_model(ModelConfig(path=str(request.getfixturevalue(request.param))), trainable=False)
    return loaded, StudentVision.of(loaded, ModelConfig())


def _fresh_logprobs(loaded, vision, records, groups):
    flat = [(r, s) for r, g in zip(records, groups) for s in g]
    prompts = [vision.ids(r) for r, _ in flat]
    layout = build_layout(prompts, [s.response_ids for _, s in flat], loaded.tokenizer.pad_token_id)
    extra = layout_inputs(loaded.model, layout, vision.inputs([r for r, _ in flat]), [len(p) for p in prompts])
    with torch.no_grad():
        logp_N, _ = response_logprobs(loaded.model, layout, extra_inputs=extra, suppress_ids=vision.suppress_ids)
    return logp_N, torch.tensor([x for _, s in flat for x in s.logprobs])


def test_rollout_logprobs_equal_a_fresh_forward(vlm, color_images):
    loaded, vision = vlm
    records = [PromptRecord("a", "vqa", "What color?", images=[str(color_images["red"])]),
               PromptRecord("b", "vqa", [{"role": "user", "content": [
                   {"type": "text", "text": "Look: "}, {"type": "image", "image": str(color_images["blue"])},
                   {"type": "text", "text": " which color is the square?"}]}]),
               PromptRecord("c", "vqa", "No image here, just text.")]  # text row in a vision batch
    tok = loaded.tokenizer
    groups = generate(loaded.model, [vision.ids(r) for r in records], RolloutConfig(max_new_tokens=10), n=2,
                      eos_ids={tok.eos_token_id}, pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0),
                      multimodal=vision.inputs(records), suppress_ids=vision.suppress_ids)
    responses = [s.response_ids for g in groups for s in g]
    assert sum(map(len, responses)) > 20
    assert not set(vision.suppress_ids) & {t for r in responses for t in r}  # placeholders never sampled
    fresh, rollout = _fresh_logprobs(loaded, vision, records, groups)
    assert torch.allclose(fresh, rollout, atol=1e-4), (fresh - rollout).abs().max()


def test_the_image_changes_the_logprobs(vlm, color_images):
    loaded, vision = vlm
    response = loaded.tokenizer("red square", add_special_tokens=False)["input_ids"]
    out = []
    for color in ("red", "blue"):
        rec = PromptRecord(color, "vqa", "What color?", images=[str(color_images[color])])
        ids = vision.ids(rec)
        layout = build_layout([ids], [response], loaded.tokenizer.pad_token_id)
        with torch.no_grad():
            out.append(response_logprobs(loaded.model, layout, extra_inputs=layout_inputs(
                loaded.model, layout, vision.inputs([rec]), [len(ids)]))[0])
    assert (out[0] - out[1]).abs().max() > 1e-4


def test_text_models_take_the_text_path(tiny_student_dir):
    loaded = load_model(ModelConfig(path=str(tiny_student_dir)), trainable=False)
    assert not loaded.is_multimodal and StudentVision.of(loaded, ModelConfig()) is None
