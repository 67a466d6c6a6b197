"""The lean decode step computes what the model's own forward computes."""

import pytest
import torch
from helpers import DIMS, FAMILIES
from helpers import family_model as _model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from uniopd.cpu.lean import unsupported_reason
from uniopd.rollout.hf import generate_batch, lean_decode_reason

PROMPTS = [[2, 5, 9, 14, 30, 31, 7], [2, 44], [2, 60, 61, 62]]  # different lengths: rows are left-padded


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lean_decode_matches_a_full_forward_of_the_sampled_sequence(family):
    model = _model(family)
    assert unsupported_reason(model) is None
    samples = generate_batch(model, PROMPTS, eos_ids={1}, pad_id=0, max_new_tokens=12, min_new_tokens=12,
                             temperature=0.8, generator=torch.Generator().manual_seed(3))
    for prompt, s in zip(PROMPTS, samples):
        ids = torch.tensor([prompt + s.response_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1: -1] / 0.8
        logits[:, 1] = float("-inf")  # EOS is blocked until min_new_tokens: sampled from the rest
        want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(s.response_ids)[:, None]).squeeze(-1)
        assert len(s.response_ids) == 12
        torch.testing.assert_close(torch.tensor(s.logprobs), want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lean_and_hf_decode_draw_the_same_tokens(family):
    model = _model(family)
    runs = {d: generate_batch(model, PROMPTS, eos_ids={1}, pad_id=0, max_new_tokens=10, top_p=0.9,
                              generator=torch.Generator().manual_seed(11), lean=lean_decode_reason(model, d) is None) for d in ("auto", "hf")}
    assert [s.response_ids for s in runs["auto"]] == [s.response_ids for s in runs["hf"]]
    for a, b in zip(runs["auto"], runs["hf"]):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=2e-5, rtol=0)
        assert a.finished == b.finished


def test_other_architectures_decode_through_their_own_forward():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    assert "gpt2" in unsupported_reason(gpt2)
    windowed = MistralForCausalLM(MistralConfig(**DIMS, sliding_window=16))
    assert unsupported_reason(windowed) == "sliding-window attention"
    gelu = LlamaForCausalLM(LlamaConfig(**DIMS, hidden_act="gelu"))
    assert "gelu" in unsupported_reason(gelu)
    out = generate_batch(gpt2, PROMPTS, eos_ids={1}, pad_id=0, max_new_tokens=4, min_new_tokens=4,
                         generator=torch.Generator().manual_seed(0))
    assert [len(s.response_ids) for s in out] == [4, 4, 4]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_lean_decode_in_bfloat16_draws_the_model_forwards_tokens(family):
    model = _model(family).to(torch.bfloat16)
    runs = {d: generate_batch(model, PROMPTS, eos_ids={1}, pad_id=0, max_new_tokens=10, min_new_tokens=10,
                              generator=torch.Generator().manual_seed(11), lean=lean_decode_reason(model, d) is None) for d in ("auto", "hf")}
    assert [s.response_ids for s in runs["auto"]] == [s.response_ids for s in runs["hf"]]
    for prompt, s in zip(PROMPTS, runs["auto"]):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + s.response_ids])).logits[0, len(prompt) - 1: -1].float()
        logits[:, 1] = float("-inf")
        want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(s.response_ids)[:, None]).squeeze(-1)
        # bf16 keeps ~3 significant digits; a cached decode and a full forward round differently.
        torch.testing.assert_close(torch.tensor(s.logprobs), want, atol=1e-2, rtol=0)


def test_a_rope_that_changes_with_the_sequence_length_is_asked_each_step():
    # Dynamic NTK scaling rescales every frequency once a position passes max_position_embeddings
    # (8 here), so no table built before decoding could hold it; decoding must follow the model's own steps.
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**DIMS, "max_position_embeddings": 8},
                                         rope_scaling={"rope_type": "dynamic", "factor": 2.0})).eval()
    runs = {d: generate_batch(model, PROMPTS, eos_ids={1}, pad_id=0, max_new_tokens=12, min_new_tokens=12,
                              temperature=0.8, generator=torch.Generator().manual_seed(5), lean=lean_decode_reason(model, d) is None)
            for d in ("auto", "hf")}
    assert [s.response_ids for s in runs["auto"]] == [s.response_ids for s in runs["hf"]]
    for a, b in zip(runs["auto"], runs["hf"]):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=2e-5, rtol=0)
