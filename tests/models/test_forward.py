"""Response layouts, and running a micro-batch's shared prompt prefix once."""

import pytest
import torch
from helpers import DIMS, FAMILIES, family_model
from transformers import MistralConfig, MistralForCausalLM

import uniopd.models.forward as fwd
from uniopd.models.forward import build_layout, response_hidden, response_logprobs
from uniopd.models.prefix import PrefixPlan, plan_prefix, shared_prefix_len

HEADER = [2, 11, 12, 13, 14, 15, 16, 17, 18, 19]  # a 10-token template header every prompt starts with
PROMPTS = [HEADER + [40, 41, 42], HEADER + [50], HEADER + [60, 61, 62, 63, 64]]
RESPONSES = [[7, 8, 9, 10], [20, 21], [30, 31, 32, 33, 34, 35]]  # different lengths: rows are right-padded
# Two prompts (no common header) with two and three rollouts each, as rollout.n > 1 lays them out.
A, B = [3, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29], [4, 50, 51, 52, 53, 54, 55, 56]
GROUP_PROMPTS = [A, A, B, B, B]
GROUP_RESPONSES = [[7, 8, 9], [10, 11], [12, 13, 14, 15], [16], [17, 18]]
LAYOUTS = {"header": (PROMPTS, RESPONSES), "groups": (GROUP_PROMPTS, GROUP_RESPONSES)}


def _lengths(prompts, responses):
    return [len(p) + len(r) for p, r in zip(prompts, responses)]


def test_a_header_every_prompt_starts_with_is_shared_up_to_the_shortest_prompts_last_token():
    assert shared_prefix_len(PROMPTS) == 10
    # The last prompt token predicts the first response token, so it stays in every row's own part.
    assert shared_prefix_len([HEADER, HEADER + [5], HEADER]) == 9
    assert shared_prefix_len([[9] + HEADER, [8] + HEADER]) == 0  # differ at the first token
    assert plan_prefix(PROMPTS, _lengths(PROMPTS, RESPONSES)) == PrefixPlan([0, 0, 0], [10], [0])
    assert build_layout(PROMPTS, RESPONSES, 0).prefix is None  # only when asked
    assert build_layout(PROMPTS, RESPONSES, 0, share_prefix=True).prefix == PrefixPlan([0, 0, 0], [10], [0])


def test_rollouts_of_one_prompt_share_all_of_it_but_its_last_token():
    plan = plan_prefix(GROUP_PROMPTS, _lengths(GROUP_PROMPTS, GROUP_RESPONSES))
    assert plan == PrefixPlan([0, 0, 1, 1, 1], [len(A) - 1, len(B) - 1], [0, 2])
    assert plan.offsets() == [10, 10, 7, 7, 7]
    # Pairs of rollouts of prompts under a common header: the plan computing fewer positions wins.
    short, long_ = [HEADER + [40 + i] * 4 for i in range(2)], [HEADER + [40 + i] * 10 for i in range(2)]
    two_each = lambda ps: [ps[0], ps[0], ps[1], ps[1]]  # noqa: E731
    # header 10 + 4 x 8 = 42 against groups 2 x 13 + 4 x 5 = 46; header 10 + 4 x 12 = 58 against 2 x 19 + 4 x 3 = 50
    assert plan_prefix(two_each(short), [14 + 4] * 4) == PrefixPlan([0, 0, 0, 0], [10], [0])
    assert plan_prefix(two_each(long_), [20 + 2] * 4) == PrefixPlan([0, 0, 1, 1], [19, 19], [0, 2])


def test_nothing_is_shared_when_it_would_save_little():
    assert plan_prefix([HEADER + [5]], [14]) is None  # one row
    assert plan_prefix([[1, 2, 3], [1, 2, 4]], [5, 5]) is None  # 2 positions saved: below PREFIX_MIN_SAVED
    assert plan_prefix([[7], [7], [7]], [30, 30, 30]) is None  # one-token prompts: nothing before the last token


def _positions_run(model, fn):
    """How many token positions the body's embedding layer sees while fn runs."""
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(a[0].numel()))
    try:
        return fn(), sum(seen)
    finally:
        hook.remove()


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_a_shared_prefix_gives_the_full_forwards_hidden_states_with_fewer_positions(family, kind):
    model = family_model(family)
    prompts, responses = LAYOUTS[kind]
    full = build_layout(prompts, responses, 0)
    shared = build_layout(prompts, responses, 0, share_prefix=True)
    with torch.no_grad():
        want, n_full = _positions_run(model, lambda: response_hidden(model, full))
        got, n_shared = _positions_run(model, lambda: response_hidden(model, shared))
    B, L = full.input_ids_BL.shape
    # header: 10 once + 3 rows of L - 10; groups: 2 prefixes padded to 10 + 5 rows of their longest rest (5).
    assert (n_full, n_shared) == ((B * L, 10 + B * (L - 10)) if kind == "header" else (B * L, 2 * 10 + B * 5))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("family, kind", [("llama", "header"), ("qwen3", "groups")])
def test_a_shared_prefix_gives_the_full_forwards_gradients(family, kind):
    model = family_model(family).train()
    prompts, responses = LAYOUTS[kind]
    weights = torch.randn(sum(len(r) for r in responses), generator=torch.Generator().manual_seed(0))
    grads = {}
    for share in (False, True):
        model.zero_grad(set_to_none=True)
        logp_N, _ = response_logprobs(model, build_layout(prompts, responses, 0, share_prefix=share))
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
