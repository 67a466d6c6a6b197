"""Full-vocabulary losses: hand-computed values, a TRL-style reference, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from uniopd.algo.losses.dense import (
    forward_kl,
    generalized_jsd,
    mixed_kl,
    reduce_tokens,
    reverse_kl,
)

# Tiny vocabulary, one token: S = [0.6, 0.3, 0.1], T = [0.2, 0.5, 0.3].
S_PROBS = [0.6, 0.3, 0.1]
T_PROBS = [0.2, 0.5, 0.3]
# KL(S||T) = 0.6 ln 3 + 0.3 ln 0.6 + 0.1 ln(1/3)
REVERSE = 0.6 * math.log(3) + 0.3 * math.log(0.6) + 0.1 * math.log(1 / 3)  # 0.396058
# KL(T||S) = 0.2 ln(1/3) + 0.5 ln(5/3) + 0.3 ln 3
FORWARD = 0.2 * math.log(1 / 3) + 0.5 * math.log(5 / 3) + 0.3 * math.log(3)  # 0.365274
# beta = 0.5: M = [0.4, 0.4, 0.2]
JSD_HALF = 0.5 * (0.2 * math.log(0.2 / 0.4) + 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.2)) + 0.5 * (
    0.6 * math.log(0.6 / 0.4) + 0.3 * math.log(0.3 / 0.4) + 0.1 * math.log(0.1 / 0.2)
)  # 0.091121
# beta = 0.3: M = 0.3 T + 0.7 S = [0.48, 0.36, 0.16]
JSD_03 = 0.3 * (0.2 * math.log(0.2 / 0.48) + 0.5 * math.log(0.5 / 0.36) + 0.3 * math.log(0.3 / 0.16)) + 0.7 * (
    0.6 * math.log(0.6 / 0.48) + 0.3 * math.log(0.3 / 0.36) + 0.1 * math.log(0.1 / 0.16)
)  # 0.075855


def _tiny():
    s = torch.tensor(S_PROBS, dtype=torch.float64).log().view(1, 1, 3)
    t = torch.tensor(T_PROBS, dtype=torch.float64).log().view(1, 1, 3)
    return s, t, torch.ones(1, 1, dtype=torch.bool)


def test_hand_values_tiny_vocab():
    s, t, m = _tiny()
    assert abs(REVERSE - 0.396058) < 1e-6 and abs(FORWARD - 0.365274) < 1e-6
    assert reverse_kl(s, t, m).item() == pytest.approx(REVERSE, abs=1e-12)
    assert forward_kl(s, t, m).item() == pytest.approx(FORWARD, abs=1e-12)
    assert generalized_jsd(s, t, m, beta=0.5).item() == pytest.approx(JSD_HALF, abs=1e-12)
    assert generalized_jsd(s, t, m, beta=0.3).item() == pytest.approx(JSD_03, abs=1e-12)
    assert generalized_jsd(s, t, m, beta=0.0).item() == pytest.approx(FORWARD, abs=1e-12)
    assert generalized_jsd(s, t, m, beta=1.0).item() == pytest.approx(REVERSE, abs=1e-12)
    expected_mix = 0.25 * FORWARD + 0.75 * REVERSE  # 0.388362
    assert mixed_kl(s, t, m, forward_weight=0.25).item() == pytest.approx(expected_mix, abs=1e-12)


def test_logit_shift_invariance_and_temperature_by_hand():
    s, t, m = _tiny()
    # Adding a constant per position changes nothing (softmax).
    assert reverse_kl(s + 3.0, t - 1.0, m).item() == pytest.approx(REVERSE, abs=1e-12)
    # temperature 2 on log-probs gives S2 ∝ sqrt(S), T2 ∝ sqrt(T).
    s2 = [p**0.5 for p in S_PROBS]
    t2 = [p**0.5 for p in T_PROBS]
    s2 = [p / sum(s2) for p in s2]
    t2 = [p / sum(t2) for p in t2]
    expected = sum(a * math.log(a / b) for a, b in zip(s2, t2))
    assert reverse_kl(s, t, m, temperature=2.0).item() == pytest.approx(expected, abs=1e-12)
    assert reverse_kl(s, t, m, temperature=2.0).item() == pytest.approx(
        reverse_kl(s / 2.0, t / 2.0, m).item(), abs=1e-12
    )


# ---------------------------------------------------------------- references (TRL-style)


def ref_generalized_jsd(student_logits, teacher_logits, mask, beta, temperature=1.0):
    """TRL GKDTrainer.generalized_jsd_loss, with a token-mean over the mask instead of batchmean."""
    s_lp = F.log_softmax(student_logits / temperature, dim=-1)
    t_lp = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(s_lp, t_lp, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t_lp, s_lp, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=s_lp.dtype)
        mix = torch.logsumexp(torch.stack([s_lp + torch.log(1 - b), t_lp + torch.log(b)]), dim=0)
        kl_t = F.kl_div(mix, t_lp, reduction="none", log_target=True)
        kl_s = F.kl_div(mix, s_lp, reduction="none", log_target=True)
        jsd = b * kl_t + (1 - b) * kl_s
    per_token = jsd.sum(-1)
    return per_token[mask].sum() / mask.sum()


def ref_loop_kl(p_logits, q_logits, mask, temperature=1.0):
    """KL(p||q) by explicit loops over valid positions."""
    total, count = 0.0, 0
    for b in range(p_logits.shape[0]):
        for t in range(p_logits.shape[1]):
            if mask[b, t]:
                p = torch.softmax(p_logits[b, t] / temperature, -1)
                q = torch.softmax(q_logits[b, t] / temperature, -1)
                total = total + sum(p[v] * torch.log(p[v] / q[v]) for v in range(p.shape[0]))
                count += 1
    return total / count


def _random(seed=0, B=3, T=5, V=11, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, T, V, generator=g, dtype=dtype) * 2).requires_grad_()
    t = torch.randn(B, T, V, generator=g, dtype=dtype) * 2
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 0] = True
    return s, t, mask


def _grad(fn, x):
    (g,) = torch.autograd.grad(fn(x), x)
    return g


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_reverse_and_forward_match_loop_reference(temperature):
    s, t, mask = _random()
    ours_r = lambda x: reverse_kl(x, t, mask, temperature=temperature)  # noqa: E731
    ref_r = lambda x: ref_loop_kl(x, t, mask, temperature)  # noqa: E731
    ours_f = lambda x: forward_kl(x, t, mask, temperature=temperature)  # noqa: E731
    ref_f = lambda x: ref_loop_kl(t, x, mask, temperature)  # noqa: E731
    for ours, ref in [(ours_r, ref_r), (ours_f, ref_f)]:
        torch.testing.assert_close(ours(s), ref(s), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(_grad(ours, s), _grad(ref, s), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_generalized_jsd_matches_trl_reference(beta, temperature):
    s, t, mask = _random(seed=1)
    ours = lambda x: generalized_jsd(x, t, mask, beta=beta, temperature=temperature)  # noqa: E731
    ref = lambda x: ref_generalized_jsd(x, t, mask, beta, temperature)  # noqa: E731
    torch.testing.assert_close(ours(s), ref(s), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_grad(ours, s), _grad(ref, s), rtol=1e-8, atol=1e-12)


def test_jsd_endpoints_and_symmetric_case():
    s, t, mask = _random(seed=2)
    torch.testing.assert_close(generalized_jsd(s, t, mask, beta=0.0), forward_kl(s, t, mask))
    torch.testing.assert_close(generalized_jsd(s, t, mask, beta=1.0), reverse_kl(s, t, mask))
    # TRL's convention is discontinuous at the endpoints: as beta -> 0, M -> S and the
    # mixture form tends to 0, while beta = 0 is defined as KL(T || S).
    assert generalized_jsd(s, t, mask, beta=1e-9).item() < 1e-6
    # beta = 0.5: the textbook JSD = H(M) - (H(S) + H(T)) / 2, symmetric in S and T.
    ps, pt = torch.softmax(s, -1), torch.softmax(t, -1)
    pm = 0.5 * (ps + pt)
    ent = lambda p: -(p * p.log()).sum(-1)  # noqa: E731
    direct = (ent(pm) - 0.5 * (ent(ps) + ent(pt)))[mask].mean()
    torch.testing.assert_close(generalized_jsd(s, t, mask, beta=0.5), direct)
    torch.testing.assert_close(generalized_jsd(t, s, mask, beta=0.5), direct)
    assert direct.item() <= math.log(2)


def test_mixed_kl_is_the_weighted_sum():
    s, t, mask = _random(seed=3)
    for w in (0.0, 0.3, 1.0):
        expected = w * forward_kl(s, t, mask) + (1 - w) * reverse_kl(s, t, mask)
        torch.testing.assert_close(mixed_kl(s, t, mask, forward_weight=w), expected)


ALL_LOSSES = [
    ("reverse", lambda s, t, m, **kw: reverse_kl(s, t, m, **kw)),
    ("forward", lambda s, t, m, **kw: forward_kl(s, t, m, **kw)),
    ("jsd", lambda s, t, m, **kw: generalized_jsd(s, t, m, beta=0.4, **kw)),
    ("mix", lambda s, t, m, **kw: mixed_kl(s, t, m, forward_weight=0.3, **kw)),
]


@pytest.mark.parametrize("name,fn", ALL_LOSSES)
def test_gradcheck_float64(name, fn):
    s, t, mask = _random(seed=4, B=2, T=3, V=5)
    t = t.clone().requires_grad_()  # the teacher's gradient is correct too, if asked for
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, mask, temperature=1.3), (s, t))


@pytest.mark.parametrize("name,fn", ALL_LOSSES)
def test_masked_tokens_are_ignored(name, fn):
    s, t, mask = _random(seed=5)
    # Garbage (but finite) logits at masked positions change nothing, and get zero gradient.
    s2 = torch.where(mask.unsqueeze(-1), s, torch.full_like(s, 1e3)).detach().requires_grad_()
    torch.testing.assert_close(fn(s2, t, mask), fn(s, t, mask))
    (g,) = torch.autograd.grad(fn(s2, t, mask), s2)
    assert torch.all(g[~mask] == 0)
    # Token-mean over the batch, not mean of per-sequence means.
    per_token = fn(s, t, mask, reduction="none")
    assert per_token.shape == mask.shape
    torch.testing.assert_close(fn(s, t, mask), per_token[mask].mean())
    torch.testing.assert_close(fn(s, t, mask, reduction="sum"), per_token[mask].sum())


@pytest.mark.parametrize("name,fn", ALL_LOSSES)
def test_empty_mask_gives_zero_with_graph(name, fn):
    s, t, _ = _random(seed=6)
    empty = torch.zeros(s.shape[:2], dtype=torch.bool)
    loss = fn(s, t, empty)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.all(s.grad == 0)


def test_half_precision_is_upcast():
    s, t, mask = _random(seed=7, dtype=torch.float32)
    loss = reverse_kl(s.detach().bfloat16(), t.bfloat16(), mask)
    assert loss.dtype == torch.float32
    ref = reverse_kl(s.detach().bfloat16().float(), t.bfloat16().float(), mask)
    torch.testing.assert_close(loss, ref)


def test_bad_arguments_raise():
    s, t, mask = _random()
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(s, t, mask, beta=1.5)
    with pytest.raises(ValueError, match="forward_weight"):
        mixed_kl(s, t, mask, forward_weight=-0.1)
    with pytest.raises(ValueError, match="temperature"):
        reverse_kl(s, t, mask, temperature=0.0)
    with pytest.raises(ValueError, match="same shape"):
        reverse_kl(s, t[..., :-1], mask)
    with pytest.raises(ValueError, match="mask shape"):
        reverse_kl(s, t, mask[:, :-1])
    with pytest.raises(ValueError, match="reduction"):
        reduce_tokens(s.sum(-1), mask, "batchmean")


@settings(max_examples=25, deadline=None)
@given(
    beta=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    scale=st.floats(0.01, 20.0),
)
def test_jsd_is_nonnegative_and_bounded(beta, seed, scale):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, 3, 7, generator=g, dtype=torch.float64) * scale
    t = torch.randn(2, 3, 7, generator=g, dtype=torch.float64) * scale
    mask = torch.ones(2, 3, dtype=torch.bool)
    value = generalized_jsd(s, t, mask, beta=beta).item()
    assert value >= -1e-12 and math.isfinite(value)
    if 0.0 < beta < 1.0:
        # Each KL(P || M) <= -log(weight of P in M), so the weighted sum is bounded.
        bound = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
        assert value <= bound + 1e-9
