"""Multimodal helpers: prompt encoding, batching, M-RoPE positions against the model's own path, restriction."""

import pytest
import torch

from uniopd.config import ModelConfig, TeacherConfig
from uniopd.data.records import PromptRecord
from uniopd.models.loading import load_model
from uniopd.models.multimodal import (MultimodalInputs, PlaceholderProcessor, collate, restrict_logprobs,
                                      vision_messages)
from uniopd.teachers.local import LocalTeacher


@pytest.fixture(scope="module")
def vlm_teacher(tiny_vlm_teacher_dir):
    return load_model(ModelConfig(path=str(tiny_vlm_teacher_dir)), trainable=False)


def test_loader_builds_a_vlm_with_a_processor(vlm_teacher):
    assert vlm_teacher.is_multimodal and type(vlm_teacher.model).__name__ == "Qwen2VLForConditionalGeneration"
    # no torchvision here: the Qwen-VL AutoProcessor cannot be built, the placeholder processor stands in
    assert isinstance(vlm_teacher.processor, PlaceholderProcessor)


def test_vision_messages_place_field_images_first():
    msgs = vision_messages("Color?", ["a.png"], system_prompt="Be brief.")
    assert msgs == [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Color?"}]}]


def test_collate_pads_token_types_left_and_right():
    a = MultimodalInputs({"pixel_values": torch.ones(4, 3)}, {"mm_token_type_ids": torch.tensor([0, 1, 1])})
    b = MultimodalInputs({"pixel_values": torch.zeros(2, 3)}, {"mm_token_type_ids": torch.tensor([1, 0])})
    left = collate([a, None, b], [3, 2, 2], 4, left=True)
    assert left["pixel_values"].shape == (6, 3)
    assert left["mm_token_type_ids"].tolist() == [[0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 1, 0]]
    right = collate([a, None, b], [3, 2, 2], 5, left=False)
    assert right["mm_token_type_ids"].tolist() == [[0, 1, 1, 0, 0], [0] * 5, [1, 0, 0, 0, 0]]


def test_restrict_logprobs_equals_a_masked_log_softmax():
    torch.manual_seed(0)
    hidden_NH, head_VH = torch.randn(5, 8, dtype=torch.float64), torch.randn(11, 8, dtype=torch.float64)
    target_N = torch.tensor([0, 3, 4, 10, 2])
    suppressed = [5, 7]
    logits_NV = hidden_NH @ head_VH.T / 0.7
    logp_N = torch.log_softmax(logits_NV, -1).gather(-1, target_N[:, None]).squeeze(-1)
    masked = logits_NV.clone()
    masked[:, suppressed] = float("-inf")
    expected = torch.log_softmax(masked, -1).gather(-1, target_N[:, None]).squeeze(-1)
    got = restrict_logprobs(logp_N, hidden_NH, head_VH, target_N, suppressed, temperature=0.7)
    assert torch.allclose(got, expected, atol=1e-9)


def test_vlm_teacher_scores_equal_the_models_own_forward(vlm_teacher, color_images):
    """Our M-RoPE positions and padding give what the model computes by itself on one unpadded sequence."""
    teacher = LocalTeacher("t", TeacherConfig(path="x"), vlm_teacher, micro_batch_size=3)
    tok = vlm_teacher.tokenizer
    recs = [PromptRecord("r", "vqa", "Color?", images=[str(color_images["red"])]),
            PromptRecord("b", "vqa", "What is the color of this square?", images=[str(color_images["blue"])]),
            PromptRecord("t", "vqa", "text only")]
    responses = [tok("red", add_special_tokens=False)["input_ids"], tok("blue!", add_special_tokens=False)["input_ids"],
                 [40, 41]]
    scores = teacher.score(recs, responses)
    expected = []
    with torch.no_grad():
        for rec, resp in zip(recs, responses):
            ids, mm = teacher.vision_inputs(rec)
            full = torch.tensor([ids + resp])
            types = torch.cat([mm.token_types["mm_token_type_ids"], torch.zeros(len(resp), dtype=torch.long)])[None]
            logits = vlm_teacher.model(input_ids=full, mm_token_type_ids=types, **mm.tensors).logits[0]
            logp = torch.log_softmax(logits.float(), -1)
            expected += [logp[len(ids) - 1 + j, t] for j, t in enumerate(resp)]
    assert torch.allclose(scores.logp_N, torch.stack(expected), atol=1e-4)
