"""Top-k restricted KL: hand-computed values, a loop reference, k = V, teacher-top-k input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from uniopd.algo.losses.dense import forward_kl, reverse_kl
from uniopd.algo.losses.topk import TOPK_SOURCES, topk_kl, topk_kl_from_teacher_topk

ln = math.log

# One token, V = 4, k = 2.  S = [0.4, 0.3, 0.2, 0.1], T = [0.3, 0.1, 0.4, 0.2].
# top-2(S) = {0, 1}, top-2(T) = {2, 0}, union = {0, 1, 2}, intersection = {0}.
S_PROBS = [0.4, 0.3, 0.2, 0.1]
T_PROBS = [0.3, 0.1, 0.4, 0.2]
HAND = [
    # (source, renormalize, tail, direction, expected)
    # teacher set {0, 2}: S mass 0.6, T mass 0.7; renormalised S^A = [2/3, 1/3], T^A = [3/7, 4/7]
    ("teacher", True, False, "reverse", (2 / 3) * ln((2 / 3) / (3 / 7)) + (1 / 3) * ln((1 / 3) / (4 / 7))),
    ("teacher", True, False, "forward", (3 / 7) * ln((3 / 7) / (2 / 3)) + (4 / 7) * ln((4 / 7) / (1 / 3))),
    # not renormalised: can be negative (-0.0235 here): it is not a KL
    ("teacher", False, False, "reverse", 0.4 * ln(0.4 / 0.3) + 0.2 * ln(0.2 / 0.4)),
    ("teacher", False, False, "forward", 0.3 * ln(0.3 / 0.4) + 0.4 * ln(0.4 / 0.2)),
    # tail bucket: S tail 0.4, T tail 0.3
    ("teacher", False, True, "reverse", 0.4 * ln(0.4 / 0.3) + 0.2 * ln(0.2 / 0.4) + 0.4 * ln(0.4 / 0.3)),
    ("teacher", True, True, "forward", 0.3 * ln(0.3 / 0.4) + 0.4 * ln(0.4 / 0.2) + 0.3 * ln(0.3 / 0.4)),
    # student set {0, 1}: S^A = [4/7, 3/7], T^A = [3/4, 1/4]; tails S 0.3, T 0.6
    ("student", True, False, "reverse", (4 / 7) * ln((4 / 7) / 0.75) + (3 / 7) * ln((3 / 7) / 0.25)),
    ("student", False, False, "reverse", 0.4 * ln(0.4 / 0.3) + 0.3 * ln(0.3 / 0.1)),
    ("student", False, True, "reverse", 0.4 * ln(0.4 / 0.3) + 0.3 * ln(0.3 / 0.1) + 0.3 * ln(0.3 / 0.6)),
    # union {0, 1, 2}: S^A = [4, 3, 2] / 9, T^A = [3, 1, 4] / 8; tails S 0.1, T 0.2
    (
        "union", True, False, "reverse",
        (4 / 9) * ln((4 / 9) / (3 / 8)) + (3 / 9) * ln((3 / 9) / (1 / 8)) + (2 / 9) * ln((2 / 9) / (4 / 8)),
    ),
    ("union", False, False, "reverse", 0.4 * ln(0.4 / 0.3) + 0.3 * ln(0.3 / 0.1) + 0.2 * ln(0.2 / 0.4)),
    (
        "union", False, True, "reverse",
        0.4 * ln(0.4 / 0.3) + 0.3 * ln(0.3 / 0.1) + 0.2 * ln(0.2 / 0.4) + 0.1 * ln(0.1 / 0.2),
    ),
    # intersection {0}: renormalised it is [1] vs [1]; tails S 0.6, T 0.7
    ("intersection", True, False, "reverse", 0.0),
    ("intersection", False, False, "reverse", 0.4 * ln(0.4 / 0.3)),
    ("intersection", False, True, "reverse", 0.4 * ln(0.4 / 0.3) + 0.6 * ln(0.6 / 0.7)),
    ("intersection", False, True, "forward", 0.3 * ln(0.3 / 0.4) + 0.7 * ln(0.7 / 0.6)),
]


@pytest.mark.parametrize("source,renormalize,tail,direction,expected", HAND)
def test_hand_values_tiny_vocab(source, renormalize, tail, direction, expected):
    s = torch.tensor(S_PROBS, dtype=torch.float64).log().view(1, 1, 4)
    t = torch.tensor(T_PROBS, dtype=torch.float64).log().view(1, 1, 4)
    mask = torch.ones(1, 1, dtype=torch.bool)
    value = topk_kl(
        s, t, mask, k=2, source=source, renormalize=renormalize, tail=tail, direction=direction
    )
    assert value.item() == pytest.approx(expected, abs=1e-12)


def test_unnormalised_variant_can_be_negative():
    # Documented choice: no clamp.
    assert HAND[2][4] < 0


# ------------------------------------------------------------------------- loop reference


def ref_topk_kl(
    s_logits, t_logits, mask, *, k, source, renormalize, tail, direction, temperature=1.0
):
    """Definition, position by position, with Python sets and 1 - sum for the tail."""
    total, count = 0.0, 0
    V = s_logits.shape[-1]
    for b in range(s_logits.shape[0]):
        for t in range(s_logits.shape[1]):
            if not mask[b, t]:
                continue
            count += 1
            ps = torch.softmax(s_logits[b, t] / temperature, -1)
            pt = torch.softmax(t_logits[b, t] / temperature, -1)
            top_s = set(torch.topk(ps, k).indices.tolist())
            top_t = set(torch.topk(pt, k).indices.tolist())
            chosen = {
                "student": top_s, "teacher": top_t,
                "union": top_s | top_t, "intersection": top_s & top_t,
            }[source]
            idx = sorted(chosen)
            a, c = ps[idx], pt[idx]
            if tail and len(idx) < V:
                a = torch.cat([a, (1 - a.sum()).view(1)])
                c = torch.cat([c, (1 - c.sum()).view(1)])
            elif not tail and renormalize and idx:
                a, c = a / a.sum(), c / c.sum()
            p, q = (a, c) if direction == "reverse" else (c, a)
            total = total + (p * (p / q).log()).sum()
    return total / max(count, 1)


def _random(seed=0, B=2, T=4, V=9, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, T, V, generator=g, dtype=dtype) * 1.5).requires_grad_()
    t = torch.randn(B, T, V, generator=g, dtype=dtype) * 1.5
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[0, 0] = True
    return s, t, mask


COMBOS = list(itertools.product(TOPK_SOURCES, [True, False], [False, True], ["reverse", "forward"]))


@pytest.mark.parametrize("source,renormalize,tail,direction", COMBOS)
def test_matches_loop_reference_value_and_grad(source, renormalize, tail, direction):
    s, t, mask = _random(seed=COMBOS.index((source, renormalize, tail, direction)))
    opts = dict(
        k=3, source=source, renormalize=renormalize, tail=tail, direction=direction,
        temperature=1.3,
    )
    ours = topk_kl(s, t, mask, **opts)
    ref = ref_topk_kl(s, t, mask, **opts)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)
    (g_ours,) = torch.autograd.grad(ours, s)
    (g_ref,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize(
    "source,renormalize,tail,direction",
    [
        ("union", True, False, "reverse"),
        ("intersection", False, True, "reverse"),
        ("student", False, False, "forward"),
        ("teacher", True, True, "forward"),
    ],
)
def test_gradcheck_float64(source, renormalize, tail, direction):
    s, t, mask = _random(seed=11, B=2, T=2, V=6)
    opts = dict(k=2, source=source, renormalize=renormalize, tail=tail, direction=direction)
    assert torch.autograd.gradcheck(lambda x: topk_kl(x, t, mask, **opts), (s,))


@pytest.mark.parametrize("source", TOPK_SOURCES)
@pytest.mark.parametrize("renormalize,tail", [(True, False), (False, False), (False, True)])
def test_k_equals_vocab_is_the_full_kl(source, renormalize, tail):
    s, t, mask = _random(seed=3)
    for direction, full in [("reverse", reverse_kl), ("forward", forward_kl)]:
        value = topk_kl(
            s, t, mask, k=s.shape[-1], source=source, renormalize=renormalize, tail=tail,
            direction=direction, temperature=0.8,
        )
        torch.testing.assert_close(value, full(s, t, mask, temperature=0.8))
        (g,) = torch.autograd.grad(value, s)
        (g_full,) = torch.autograd.grad(full(s, t, mask, temperature=0.8), s)
        torch.testing.assert_close(g, g_full)


# ------------------------------------------------------------------ teacher top-k input


def _teacher_topk(t, k, temperature=1.0):
    out = torch.log_softmax(t / temperature, -1).topk(k, dim=-1)
    return out.values, out.indices


@pytest.mark.parametrize("renormalize,tail", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("k", [1, 3, 9])
def test_from_teacher_topk_equals_topk_teacher_source(renormalize, tail, direction, k):
    s, t, mask = _random(seed=5)
    t_lp, t_ids = _teacher_topk(t, k, temperature=1.7)
    opts = dict(renormalize=renormalize, tail=tail, direction=direction, temperature=1.7)
    ours = topk_kl_from_teacher_topk(s, t_lp, t_ids, mask, **opts)
    expected = topk_kl(s, t, mask, k=k, source="teacher", **opts)
    torch.testing.assert_close(ours, expected)
    (g,) = torch.autograd.grad(ours, s)
    (g_expected,) = torch.autograd.grad(expected, s)
    torch.testing.assert_close(g, g_expected)


def test_from_teacher_topk_ignores_padding_slots():
    s, t, mask = _random(seed=6)
    t_lp, t_ids = _teacher_topk(t, 3)
    # A backend that returned fewer than K: -inf log-prob, arbitrary (here duplicate) id.
    pad_lp = torch.cat([t_lp, torch.full_like(t_lp[..., :1], -math.inf)], dim=-1)
    pad_ids = torch.cat([t_ids, t_ids[..., :1]], dim=-1)
    for tail in (False, True):
        a = topk_kl_from_teacher_topk(s, pad_lp, pad_ids, mask, tail=tail)
        b = topk_kl_from_teacher_topk(s, t_lp, t_ids, mask, tail=tail)
        torch.testing.assert_close(a, b)
        (g,) = torch.autograd.grad(a, s)
        assert torch.isfinite(g).all()


def test_from_teacher_topk_gradcheck_with_tail():
    s, t, mask = _random(seed=7, B=1, T=3, V=5)
    t_lp, t_ids = _teacher_topk(t, 2)
    t_lp = t_lp.detach().requires_grad_()
    def fn(a, b):
        return topk_kl_from_teacher_topk(a, b, t_ids, mask, tail=True, direction="forward")

    assert torch.autograd.gradcheck(fn, (s, t_lp))


def test_confident_teacher_tail_stays_finite():
    # The teacher's returned top-1 carries all its mass (rounded to 1): tail floored, no NaN.
    s = torch.randn(1, 2, 6, dtype=torch.float32, requires_grad=True)
    t_lp = torch.zeros(1, 2, 1)
    t_ids = torch.tensor([[[0], [3]]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    for direction in ("reverse", "forward"):
        loss = topk_kl_from_teacher_topk(s, t_lp, t_ids, mask, tail=True, direction=direction)
        (g,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(loss) and torch.isfinite(g).all()
    # Same situation with full logits: the complement is summed exactly, never 1 - sum.
    t = torch.tensor([[[60.0, 0, 0, 0, 0, 0], [0, 0, 0, 60.0, 0, 0]]])
    loss = topk_kl(s, t, mask, k=1, tail=True)
    (g,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(loss) and torch.isfinite(g).all()


# ------------------------------------------------------------------ masks and edge cases


@pytest.mark.parametrize("source", TOPK_SOURCES)
def test_empty_mask_and_masked_tokens(source):
    s, t, mask = _random(seed=8)
    empty = torch.zeros_like(mask)
    loss = topk_kl(s, t, empty, k=3, source=source, tail=True)
    assert loss.item() == 0.0 and loss.requires_grad
    (g,) = torch.autograd.grad(loss, s)
    assert torch.all(g == 0)
    per_token = topk_kl(s, t, mask, k=3, source=source, reduction="none")
    torch.testing.assert_close(topk_kl(s, t, mask, k=3, source=source), per_token[mask].mean())
    assert torch.all(per_token[~mask] == 0)


def test_disjoint_top_k_gives_zero_on_empty_intersection():
    s = torch.tensor([[[5.0, 4.0, 0.0, 0.0]]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[[0.0, 0.0, 5.0, 4.0]]], dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.bool)
    for renormalize in (True, False):
        loss = topk_kl(s, t, mask, k=2, source="intersection", renormalize=renormalize)
        (g,) = torch.autograd.grad(loss, s)
        assert loss.item() == 0.0 and torch.all(g == 0)
    # With the tail bucket everything is in the tail for both: still 0.
    loss = topk_kl(s, t, mask, k=2, source="intersection", tail=True)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)


def test_bad_arguments_raise():
    s, t, mask = _random()
    with pytest.raises(ValueError, match="source"):
        topk_kl(s, t, mask, k=2, source="both")
    with pytest.raises(ValueError, match="direction"):
        topk_kl(s, t, mask, k=2, direction="sideways")
    with pytest.raises(ValueError, match="k must be"):
        topk_kl(s, t, mask, k=0)
    with pytest.raises(ValueError, match="k must be"):
        topk_kl(s, t, mask, k=s.shape[-1] + 1)
    t_lp, t_ids = _teacher_topk(t, 2)
    with pytest.raises(ValueError, match="same shape"):
        topk_kl_from_teacher_topk(s, t_lp, t_ids[..., :1], mask)
