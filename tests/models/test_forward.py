"""Response layouts, and running a micro-batch's shared prompt prefix once."""

import pytest
import torch
from helpers import DIMS, FAMILIES, family_model
from transformers import MistralConfig, MistralForCausalLM

import uniopd.models.forward as fwd
from uniopd.models.forward import build_layout, response_hidden, response_logprobs, shared_prefix_len

HEADER = [2, 11, 12, 13, 14, 15, 16, 17, 18, 19]  # a 10-token template header every prompt starts with
PROMPTS = [HEADER + [40, 41, 42], HEADER + [50], HEADER + [60, 61, 62, 63, 64]]
RESPONSES = [[7, 8, 9, 10], [20, 21], [30, 31, 32, 33, 34, 35]]  # different lengths: rows are right-padded


def test_shared_prefix_stops_where_prompts_differ_and_before_the_shortest_prompts_last_token():
    assert shared_prefix_len(PROMPTS) == 10
    # The last prompt token predicts the first response token, so it stays in every row's own part.
    assert shared_prefix_len([HEADER, HEADER + [5], HEADER]) == 9
    assert shared_prefix_len([[1] * 20, [1] * 20]) == 19  # n rollouts of one prompt share all but its last token
    assert shared_prefix_len([HEADER + [5]]) == 0  # one row: nothing to share
    assert shared_prefix_len([[1, 2, 3], [1, 2, 4]]) == 0  # 2 positions saved: below PREFIX_MIN_SAVED
    assert shared_prefix_len([[9] + HEADER, [8] + HEADER]) == 0  # differ at the first token
    assert build_layout(PROMPTS, RESPONSES, 0).prefix_len == 0  # only when asked
    assert build_layout(PROMPTS, RESPONSES, 0, share_prefix=True).prefix_len == 10


def _positions_run(model, fn):
    """How many token positions the body's embedding layer sees while fn runs."""
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(a[0].numel()))
    try:
        return fn(), sum(seen)
    finally:
        hook.remove()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_shared_prefix_gives_the_full_forwards_hidden_states_with_fewer_positions(family):
    model = family_model(family)
    full = build_layout(PROMPTS, RESPONSES, 0)
    shared = build_layout(PROMPTS, RESPONSES, 0, share_prefix=True)
    with torch.no_grad():
        want, n_full = _positions_run(model, lambda: response_hidden(model, full))
        got, n_shared = _positions_run(model, lambda: response_hidden(model, shared))
    B, L = full.input_ids_BL.shape
    assert (n_full, n_shared) == (B * L, 10 + B * (L - 10))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_shared_prefix_gives_the_full_forwards_gradients(family):
    model = family_model(family).train()
    weights = torch.randn(sum(len(r) for r in RESPONSES), generator=torch.Generator().manual_seed(0))
    grads = {}
    for share in (False, True):
        model.zero_grad(set_to_none=True)
        logp_N, _ = response_logprobs(model, build_layout(PROMPTS, RESPONSES, 0, share_prefix=share))
        (logp_N * weights).sum().backward()
        grads[share] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, atol=1e-6, rtol=1e-4, msg=name)


def test_models_it_cannot_share_for_run_the_full_forward(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the prefix was shared")

    monkeypatch.setattr(fwd, "_hidden_with_shared_prefix", refuse)
    layout = build_layout(PROMPTS, RESPONSES, 0, share_prefix=True)
    windowed = MistralForCausalLM(MistralConfig(**DIMS, sliding_window=16)).eval()
    with torch.no_grad():
        response_hidden(windowed, layout)
    checkpointed = family_model("llama").train()
    (getattr(checkpointed, "activation_checkpointing_enable", None) or checkpointed.gradient_checkpointing_enable)()
    response_hidden(checkpointed, layout).sum().backward()  # a replayed layer would append to the cache twice
    with torch.no_grad():  # nothing is replayed without a backward pass
        with pytest.raises(AssertionError, match="shared"):
            response_hidden(checkpointed, layout)
