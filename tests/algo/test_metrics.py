"""Token diagnostics against hand-computed values on a 4-token vocabulary."""

from __future__ import annotations

import math

import pytest
import torch

from uniopd.algo.losses.dense import reverse_kl
from uniopd.algo.metrics import (
    DIAGNOSTIC_KEYS,
    entropy,
    entropy_gap,
    logratio_histogram,
    overlap_token_advantage,
    reduce_diagnostic_sums,
    reverse_kl_mean,
    shared_mass,
    token_diagnostic_sums,
    token_diagnostics,
    topk_overlap,
)

ln = math.log

# Position 0: S = [0.4, 0.3, 0.2, 0.1], T = [0.5, 0.1, 0.3, 0.1].
#   top-2(S) = {0, 1}, top-2(T) = {0, 2}: shared {0}, overlap 1/2,
#   shared mass S 0.4, T 0.5, overlap-token advantage 0.4 ln(0.5 / 0.4).
# Position 1: S = T = [0.7, 0.1, 0.1, 0.1] (ties below the top-1 only; k = 2 takes one 0.1
#   for both models from identical logits, so the same one): overlap 1, masses 0.8, 0.8, adv 0.
# Position 2: masked, garbage logits.
S0, T0 = [0.4, 0.3, 0.2, 0.1], [0.5, 0.1, 0.3, 0.1]
S1 = [0.7, 0.1, 0.1, 0.1]
H_S0 = -(0.4 * ln(0.4) + 0.3 * ln(0.3) + 0.2 * ln(0.2) + 0.1 * ln(0.1))  # 1.279854
H_T0 = -(0.5 * ln(0.5) + 0.1 * ln(0.1) + 0.3 * ln(0.3) + 0.1 * ln(0.1))  # 1.168282
H_1 = -(0.7 * ln(0.7) + 3 * 0.1 * ln(0.1))  # 0.940448
KL_0 = 0.4 * ln(0.4 / 0.5) + 0.3 * ln(0.3 / 0.1) + 0.2 * ln(0.2 / 0.3) + 0.1 * ln(1.0)  # 0.159638


def _batch():
    s = torch.tensor([S0, S1, [0.25] * 4]).log().view(1, 3, 4)
    t = torch.tensor([T0, S1, [0.25] * 4]).log().view(1, 3, 4)
    s[0, 2] = torch.tensor([100.0, -100.0, 3.0, 0.0])
    mask = torch.tensor([[True, True, False]])
    return s, t, mask


def test_hand_values():
    s, t, mask = _batch()
    assert topk_overlap(s, t, mask, k=2) == pytest.approx((0.5 + 1.0) / 2)
    assert topk_overlap(s, t, mask, k=1) == pytest.approx((1.0 + 1.0) / 2)
    assert topk_overlap(s, t, mask, k=4) == pytest.approx(1.0)
    mass_s, mass_t = shared_mass(s, t, mask, k=2)
    assert mass_s == pytest.approx((0.4 + 0.8) / 2)
    assert mass_t == pytest.approx((0.5 + 0.8) / 2)
    assert overlap_token_advantage(s, t, mask, k=2) == pytest.approx(0.4 * ln(0.5 / 0.4) / 2)
    assert entropy(s, mask) == pytest.approx((H_S0 + H_1) / 2)
    assert entropy(t, mask) == pytest.approx((H_T0 + H_1) / 2)
    assert entropy_gap(s, t, mask) == pytest.approx((H_S0 - H_T0) / 2)
    assert reverse_kl_mean(s, t, mask) == pytest.approx(KL_0 / 2)


def test_token_diagnostics_matches_the_individual_functions():
    s, t, mask = _batch()
    diag = token_diagnostics(s, t, mask, k=2)
    assert set(DIAGNOSTIC_KEYS) <= diag.keys()
    expected = {
        "diag/topk_overlap": 0.75,
        "diag/shared_mass_student": 0.6,
        "diag/shared_mass_teacher": 0.65,
        "diag/overlap_token_advantage": 0.4 * ln(0.5 / 0.4) / 2,
        "diag/entropy_student": (H_S0 + H_1) / 2,
        "diag/entropy_teacher": (H_T0 + H_1) / 2,
        "diag/entropy_gap": (H_S0 - H_T0) / 2,
        "diag/reverse_kl": KL_0 / 2,
        "diag/num_tokens": 2,
    }
    for key, value in expected.items():
        assert diag[key] == pytest.approx(value, abs=1e-6), key
    assert all(isinstance(v, float) for v in diag.values())


def test_random_against_definitions_and_loss():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 5, 13, generator=g)
    t = torch.randn(3, 5, 13, generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.3
    k = 4
    diag = token_diagnostics(s, t, mask, k=k)
    assert diag["diag/reverse_kl"] == pytest.approx(reverse_kl(s, t, mask).item(), rel=1e-5)
    overlaps, adv = [], []
    for b in range(3):
        for i in range(5):
            if mask[b, i]:
                ps, pt = s[b, i].softmax(-1), t[b, i].softmax(-1)
                shared = set(ps.topk(k).indices.tolist()) & set(pt.topk(k).indices.tolist())
                overlaps.append(len(shared) / k)
                adv.append(sum(ps[j] * (pt[j] / ps[j]).log() for j in shared) if shared else 0.0)
    assert diag["diag/topk_overlap"] == pytest.approx(sum(overlaps) / len(overlaps))
    expected_adv = float(sum(adv)) / len(adv)
    assert diag["diag/overlap_token_advantage"] == pytest.approx(expected_adv, abs=1e-6)


def test_sums_combine_across_chunks():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 6, 9, generator=g)
    t = torch.randn(4, 6, 9, generator=g)
    mask = torch.rand(4, 6, generator=g) > 0.4
    whole = token_diagnostics(s, t, mask, k=3)
    parts = [
        token_diagnostic_sums(s[i : i + 1], t[i : i + 1], mask[i : i + 1], k=3) for i in range(4)
    ]
    combined = reduce_diagnostic_sums(parts)
    for key in whole:
        assert combined[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-7), key


def test_empty_mask_gives_zeros_not_nan():
    s, t, _ = _batch()
    empty = torch.zeros(1, 3, dtype=torch.bool)
    diag = token_diagnostics(s, t, empty, k=2)
    assert all(v == 0.0 for v in diag.values())
    assert topk_overlap(s, t, empty, k=2) == 0.0


def test_no_grad_and_half_precision():
    s, t, mask = _batch()
    s = s.clone().requires_grad_()
    diag = token_diagnostics(s.bfloat16(), t.bfloat16(), mask, k=2)
    assert diag["diag/topk_overlap"] == pytest.approx(0.75)
    assert diag["diag/entropy_student"] == pytest.approx((H_S0 + H_1) / 2, abs=1e-2)


def test_logratio_histogram():
    student = torch.tensor([[-12.0, -3.0, 0.0, 0.05, 0.1, 11.0, 5.0]])
    teacher = torch.zeros_like(student)
    mask = torch.tensor([[True] * 6 + [False]])
    counts = logratio_histogram(student, teacher, mask, edges=(-10.0, -1.0, 0.1, 10.0))
    # bins: (-inf,-10) [-10,-1) [-1,0.1) [0.1,10) [10,inf); the masked 5.0 is not counted
    assert counts.tolist() == [1, 1, 2, 1, 1]
    # sampled log-prob ratio is log piS - log piT
    counts = logratio_histogram(teacher, student, mask, edges=(0.0,))
    assert counts.tolist() == [3, 3]
    default = logratio_histogram(student, teacher, mask)
    assert int(default.sum()) == 6
    with pytest.raises(ValueError, match="increasing"):
        logratio_histogram(student, teacher, mask, edges=(1.0, 0.0))
