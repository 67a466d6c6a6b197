"""Hand-computed checks of uniopd.algo.calibration, plus a property test of margin_shift.

The shared batch (2 tokens per rollout, values exact in binary floating point):

    row  group  outcome    adv            mask    G
    0    7      correct    [1.0, 0.0]     TT      0.5
    1    7      correct    [1.0, 1.0]     TT      1.0
    2    7      incorrect  [0.5, 0.0]     TT      0.25
    3    7      incorrect  [1.0, 0.5]     TT      0.75
    4    3      correct    [2.0, 1.0]     TT      1.5
    5    3      incorrect  [0.0, -1.0]    TF      0.0

    group 3: minmax m = 1.5 - 0.0 = 1.5;   mean m = 1.5
    group 7: minmax m = 0.5 - 0.75 = -0.25; mean m = 0.75 - 0.5 = 0.25
    global (one group): minmax m = 0.5 - 0.75 = -0.25; mean m = 1.0 - 1/3 = 2/3
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from uniopd.algo.calibration import (
    calibration_stats,
    clip_token_mask,
    group_index,
    group_margins,
    group_pass_rates,
    margin_mask,
    margin_shift,
    margin_shift_amounts,
    sequence_returns,
)

T, F = True, False


def batch():
    adv = torch.tensor(
        [[1.0, 0.0], [1.0, 1.0], [0.5, 0.0], [1.0, 0.5], [2.0, 1.0], [0.0, -1.0]]
    )
    mask = torch.tensor([[T, T], [T, T], [T, T], [T, T], [T, T], [T, F]])
    correct = torch.tensor([T, T, F, F, T, F])
    ids = torch.tensor([7, 7, 7, 7, 3, 3])
    return adv, mask, correct, ids


def one_token(values, correct, ids=None):
    """Rollouts of a single valid token each, so G equals the value."""
    adv = torch.tensor(values, dtype=torch.float32)[:, None]
    mask = torch.ones_like(adv, dtype=torch.bool)
    ids = torch.zeros(len(values), dtype=torch.long) if ids is None else torch.tensor(ids)
    return adv, mask, torch.tensor(correct), ids


# ------------------------------------------------------------------ sequence_returns


def test_sequence_returns_masked_mean_and_empty_row():
    adv = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [1.0, float("-inf"), float("nan")]])
    mask = torch.tensor([[T, T, F], [F, F, F], [T, F, F]])
    assert torch.equal(sequence_returns(adv, mask), torch.tensor([1.5, 0.0, 1.0]))


def test_sequence_returns_of_shared_batch():
    adv, mask, _, _ = batch()
    assert torch.equal(sequence_returns(adv, mask), torch.tensor([0.5, 1.0, 0.25, 0.75, 1.5, 0.0]))


def test_sequence_returns_bf16_is_lifted():
    adv = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16)
    out = sequence_returns(adv, torch.ones(1, 2, dtype=torch.bool))
    assert out.dtype == torch.float32 and out.item() == 1.5


# --------------------------------------------------------------------- group_margins


def test_group_index_maps_arbitrary_ids():
    ids_G, index_B = group_index(torch.tensor([7, -2, 7, 40]))
    assert ids_G.tolist() == [-2, 7, 40]
    assert index_B.tolist() == [1, 0, 1, 2]


@pytest.mark.parametrize("mode,expected", [("minmax", [1.5, -0.25]), ("mean", [1.5, 0.25])])
def test_group_margins_modes(mode, expected):
    adv, mask, correct, ids = batch()
    margin_G, has_G, ids_G = group_margins(sequence_returns(adv, mask), correct, ids, mode=mode)
    assert ids_G.tolist() == [3, 7]
    assert has_G.tolist() == [T, T]
    assert margin_G.tolist() == expected


def test_group_margins_one_sided_groups_have_no_margin():
    returns = torch.tensor([1.0, 2.0, -1.0, 0.5, 0.25])
    correct = torch.tensor([T, T, F, T, F])
    ids = torch.tensor([0, 0, 1, 2, 2])
    margin_G, has_G, _ = group_margins(returns, correct, ids)
    assert has_G.tolist() == [F, F, T]
    assert margin_G.tolist() == [0.0, 0.0, 0.25]  # 0.0, not inf, for no margin


def test_group_margins_ignores_invalid_rollouts():
    returns = torch.tensor([1.0, 0.0, 0.5])
    correct = torch.tensor([T, T, F])
    ids = torch.zeros(3, dtype=torch.long)
    valid = torch.tensor([T, F, T])
    assert group_margins(returns, correct, ids, valid_B=valid).margin_G.tolist() == [0.5]
    assert group_margins(returns, correct, ids).margin_G.tolist() == [-0.5]
    valid = torch.tensor([T, T, F])
    assert group_margins(returns, correct, ids, valid_B=valid).has_margin_G.tolist() == [F]


# ---------------------------------------------------------------------- margin_shift


@pytest.mark.parametrize(
    "direction,expected",
    [
        # group 7 minmax: lambda = 0.5 - (-0.25) = 0.75
        (
            "correct_up",
            [[1.75, 0.75], [1.75, 1.75], [0.5, 0.0], [1.0, 0.5], [2.0, 1.0], [0.0, -1.0]],
        ),
        (
            "incorrect_down",
            [[1.0, 0.0], [1.0, 1.0], [-0.25, -0.75], [0.25, -0.25], [2.0, 1.0], [0.0, -1.0]],
        ),
        (
            "both",
            [[1.375, 0.375], [1.375, 1.375], [0.125, -0.375], [0.625, 0.125]]
            + [[2.0, 1.0], [0.0, -1.0]],
        ),
    ],
)
def test_margin_shift_minmax_directions(direction, expected):
    adv, mask, correct, ids = batch()
    before = adv.clone()
    out = margin_shift(adv, mask, correct, ids, delta=0.5, direction=direction)
    assert torch.equal(out, torch.tensor(expected))
    assert torch.equal(adv, before)  # not in place
    margin_G, _, _ = group_margins(sequence_returns(out, mask), correct, ids)
    assert margin_G.tolist() == [1.5, 0.5]


def test_margin_shift_mean_mode():
    adv, mask, correct, ids = batch()
    # group 7 mean: lambda = 0.5 - 0.25 = 0.25
    out = margin_shift(adv, mask, correct, ids, delta=0.5, mode="mean")
    expected = adv.clone()
    expected[0] = torch.tensor([1.25, 0.25])
    expected[1] = torch.tensor([1.25, 1.25])
    assert torch.equal(out, expected)


def test_margin_shift_global_scope_minmax_moves_every_correct_rollout():
    adv, mask, correct, ids = batch()
    # one group: min correct G 0.5 (row 0), max incorrect G 0.75 (row 3): lambda 0.75
    out = margin_shift(adv, mask, correct, ids, delta=0.5, scope="global")
    expected = adv.clone()
    expected[[0, 1, 4]] += 0.75
    assert torch.equal(out, expected)
    assert margin_shift_amounts(adv, mask, correct, ids, delta=0.5, scope="global").tolist() == [
        0.75
    ]


def test_margin_shift_global_scope_mean_already_satisfied():
    adv, mask, correct, ids = batch()
    # global mean margin 1.0 - 1/3 = 2/3 >= 0.5, though group 7 alone (0.25) violates
    out = margin_shift(adv, mask, correct, ids, delta=0.5, mode="mean", scope="global")
    assert torch.equal(out, adv)


def test_margin_shift_delta_already_satisfied_returns_equal_new_tensor():
    adv, mask, correct, ids = batch()
    out = margin_shift(adv, mask, correct, ids, delta=0.25, mode="mean")  # m = [1.5, 0.25]
    assert torch.equal(out, adv) and out is not adv
    assert margin_shift_amounts(adv, mask, correct, ids, delta=0.25, mode="mean").tolist() == [
        0.0,
        0.0,
    ]


def test_margin_shift_amounts_per_group():
    adv, mask, correct, ids = batch()
    assert margin_shift_amounts(adv, mask, correct, ids, delta=0.5).tolist() == [0.0, 0.75]
    assert margin_shift_amounts(adv, mask, correct, ids, delta=2.0).tolist() == [0.5, 2.25]


def test_margin_shift_tie_gets_full_delta():
    adv, mask, correct, ids = one_token([0.5, 0.5], [T, F])
    out = margin_shift(adv, mask, correct, ids, delta=0.4)
    assert out[:, 0].tolist() == pytest.approx([0.9, 0.5])


def test_margin_shift_leaves_one_sided_groups():
    adv, mask, correct, ids = one_token([-3.0, 1.0, 2.0, 0.0], [T, T, F, F], ids=[0, 0, 1, 1])
    out = margin_shift(adv, mask, correct, ids, delta=1.0, direction="both")
    assert torch.equal(out, adv)


def test_margin_shift_empty_rollouts_are_ignored_and_unchanged():
    # row 1 (correct) has no valid token; counted it would make min G = 0 and m = -0.5
    adv = torch.tensor([[1.0, 1.0], [5.0, 5.0], [0.5, 0.5]])
    mask = torch.tensor([[T, T], [F, F], [T, T]])
    correct = torch.tensor([T, T, F])
    ids = torch.zeros(3, dtype=torch.long)
    assert torch.equal(margin_shift(adv, mask, correct, ids, delta=0.25), adv)
    # delta 1.0: lambda = 1.0 - 0.5 = 0.5 for row 0 only; row 1 keeps its (masked) values
    out = margin_shift(adv, mask, correct, ids, delta=1.0)
    assert torch.equal(out, torch.tensor([[1.5, 1.5], [5.0, 5.0], [0.5, 0.5]]))
    # a group whose only incorrect rollout is empty has no margin
    correct = torch.tensor([T, F, T])
    assert torch.equal(margin_shift(adv, mask, correct, ids, delta=1.0), adv)


def test_margin_shift_keeps_masked_nan_and_inf_bitwise():
    adv = torch.tensor([[0.0, float("nan")], [1.0, float("-inf")]])
    mask = torch.tensor([[T, F], [T, F]])
    out = margin_shift(adv, mask, torch.tensor([T, F]), torch.tensor([0, 0]), delta=2.0)
    assert out[0, 0].item() == 3.0 and out[1, 0].item() == 1.0
    assert torch.isnan(out[0, 1]) and out[1, 1].item() == float("-inf")


def test_margin_shift_keeps_dtype():
    adv, mask, correct, ids = batch()
    out = margin_shift(adv.to(torch.bfloat16), mask, correct, ids, delta=0.5)
    assert out.dtype == torch.bfloat16
    assert out[0].tolist() == [1.75, 0.75]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"delta": 0.0}, "delta"),
        ({"delta": -1.0}, "delta"),
        ({"delta": float("nan")}, "delta"),
        ({"delta": 0.5, "mode": "median"}, "mode"),
        ({"delta": 0.5, "direction": "up"}, "direction"),
        ({"delta": 0.5, "scope": "batch"}, "scope"),
    ],
)
def test_margin_shift_rejects_bad_arguments(kwargs, match):
    adv, mask, correct, ids = batch()
    with pytest.raises(ValueError, match=match):
        margin_shift(adv, mask, correct, ids, **kwargs)


def test_shape_mismatch_is_rejected():
    adv, mask, correct, ids = batch()
    with pytest.raises(ValueError, match="shapes"):
        margin_shift(adv, mask[:, :1], correct, ids, delta=0.5)
    with pytest.raises(ValueError, match="rows"):
        margin_mask(adv, mask, correct[:3], ids[:3], delta=0.5)


# ----------------------------------------------------------------------- margin_mask


def test_margin_mask_group_strategy_minmax_and_mean():
    adv, mask, correct, ids = batch()
    keep = margin_mask(adv, mask, correct, ids, delta=0.5)
    assert keep.tolist() == [F, F, F, F, T, T]
    keep = margin_mask(adv, mask, correct, ids, delta=0.5, mode="mean")  # 0.25 < 0.5
    assert keep.tolist() == [F, F, F, F, T, T]
    keep = margin_mask(adv, mask, correct, ids, delta=0.2, mode="mean")  # 0.25 >= 0.2
    assert keep.tolist() == [T] * 6
    keep = margin_mask(adv, mask, correct, ids, delta=0.2)  # minmax -0.25 < 0.2
    assert keep.tolist() == [F, F, F, F, T, T]


def test_margin_mask_keeps_one_sided_groups_whole():
    adv, mask, correct, ids = one_token([-3.0, 1.0, 2.0, 0.0], [T, T, F, F], ids=[0, 0, 1, 1])
    for strategy in ("group", "greedy"):
        keep = margin_mask(adv, mask, correct, ids, delta=1.0, strategy=strategy)
        assert keep.all()


def test_margin_mask_greedy_hand_case():
    # correct G [0, 1, 2, 3], incorrect G [2.5, 0.5, 0.25, -1], delta 0.5, minmax.
    # m = 0 - 2.5 = -2.5; drop correct 0 -> -1.5 (gain 1), drop incorrect 2.5 -> -0.5
    # (gain 2): drop incorrect 2.5. m = -0.5; drop correct 0 -> 0.5 (gain 1), drop
    # incorrect 0.5 -> -0.25 (gain 0.25): drop correct 0. m = 0.5 >= 0.5: stop.
    adv, mask, correct, ids = one_token(
        [0.0, 1.0, 2.0, 3.0, 2.5, 0.5, 0.25, -1.0], [T, T, T, T, F, F, F, F]
    )
    keep = margin_mask(adv, mask, correct, ids, delta=0.5, strategy="greedy")
    assert keep.tolist() == [F, T, T, T, F, T, T, T]
    assert not margin_mask(adv, mask, correct, ids, delta=0.5).any()


@pytest.mark.parametrize(
    "ratio,expected",
    [
        # floor 1 per side: drop incorrect 2.5 (m -1.5), incorrect 1.5 (m -0.25),
        # incorrect 0.25 (m 1.0): every step the incorrect drop gains more.
        (0.25, [T, T, T, T, F, F, F, T]),
        # floor 2: same first two drops; incorrect now at its floor, so drop correct 0
        # (m 0) and correct 0.25 (m 2.0 - 0.25 = 1.75).
        (0.5, [F, F, T, T, F, F, T, T]),
        # floor 3: drop incorrect 2.5 (m -1.5), then only correct 0 (m -1.25); both
        # sides at their floor with m still < delta: the rest is kept.
        (0.75, [F, T, T, T, F, T, T, T]),
    ],
)
def test_margin_mask_greedy_min_retain_ratio_floor(ratio, expected):
    adv, mask, correct, ids = one_token(
        [0.0, 0.25, 2.0, 3.0, 2.5, 1.5, 0.25, -1.0], [T, T, T, T, F, F, F, F]
    )
    keep = margin_mask(
        adv, mask, correct, ids, delta=0.5, strategy="greedy", min_retain_ratio=ratio
    )
    assert keep.tolist() == expected


def test_margin_mask_greedy_stops_when_no_drop_helps():
    # ties: dropping one of two equal G changes neither min nor max
    adv, mask, correct, ids = one_token([0.0, 0.0, 1.0, 1.0], [T, T, F, F])
    keep = margin_mask(adv, mask, correct, ids, delta=0.5, strategy="greedy", min_retain_ratio=0)
    assert keep.all()


def test_margin_mask_greedy_tie_between_sides_drops_correct():
    # m = 0 - 1 = -1; dropping correct 0 or incorrect 1 both give m = 1: as the
    # release (_greedy_mask_local), the tie goes to the correct side.
    adv, mask, correct, ids = one_token([0.0, 2.0, 1.0, -1.0], [T, T, F, F])
    keep = margin_mask(adv, mask, correct, ids, delta=0.5, strategy="greedy")
    assert keep.tolist() == [F, T, T, T]


def test_margin_mask_greedy_mean_mode_and_equal_g_order():
    # mean: correct [0, 0, 3] mean 1, incorrect [0.5] -> m 0.5 < 1.0; the single
    # incorrect cannot go; dropping a correct 0 gives mean 1.5, m = 1.0: stop.
    # Of the two equal G the lower batch index goes first.
    adv, mask, correct, ids = one_token([0.0, 0.0, 3.0, 0.5], [T, T, T, F])
    keep = margin_mask(adv, mask, correct, ids, delta=1.0, mode="mean", strategy="greedy")
    assert keep.tolist() == [F, T, T, T]
    # minmax on the same data: no drop raises min (0 stays), nothing dropped
    keep = margin_mask(adv, mask, correct, ids, delta=1.0, strategy="greedy")
    assert keep.all()


def test_margin_mask_greedy_mean_tie():
    # mean: correct [0,1,2] mean 1, incorrect [2,1,0] mean 1, m = 0; either drop gives
    # m = 0.5 = delta; the tie goes to the correct side (the release's rule).
    adv, mask, correct, ids = one_token([0.0, 1.0, 2.0, 2.0, 1.0, 0.0], [T, T, T, F, F, F])
    keep = margin_mask(adv, mask, correct, ids, delta=0.5, mode="mean", strategy="greedy")
    assert keep.tolist() == [F, T, T, T, T, T]


def test_margin_mask_greedy_keeps_empty_rollouts_and_other_groups():
    adv = torch.tensor([[0.0, 0.0], [9.0, 9.0], [1.0, 1.0], [3.0, 3.0], [0.0, 0.0]])
    mask = torch.tensor([[T, T], [F, F], [T, T], [T, T], [T, T]])
    correct = torch.tensor([T, F, F, T, F])
    ids = torch.tensor([0, 0, 0, 1, 1])
    # group 0: the empty incorrect row 1 is ignored; m = 0 - 1 = -1; one per side, so
    # nothing can be dropped. Group 1: m = 3 >= 0.5.
    keep = margin_mask(adv, mask, correct, ids, delta=0.5, strategy="greedy")
    assert keep.all()
    keep = margin_mask(adv, mask, correct, ids, delta=0.5, strategy="group")
    assert keep.tolist() == [F, F, F, T, T]


def test_margin_mask_rejects_bad_arguments():
    adv, mask, correct, ids = batch()
    with pytest.raises(ValueError, match="strategy"):
        margin_mask(adv, mask, correct, ids, delta=0.5, strategy="rollout")
    with pytest.raises(ValueError, match="min_retain_ratio"):
        margin_mask(adv, mask, correct, ids, delta=0.5, min_retain_ratio=1.5)


# ------------------------------------------------------------------- clip_token_mask


def test_clip_token_mask():
    student = torch.tensor([[-1.0, -12.0, -3.0], [0.0, -5.0, float("nan")]])
    teacher = torch.tensor([[-1.5, -1.0, -3.0], [-10.0, -5.0, -1.0]])
    mask = torch.tensor([[T, T, F], [T, F, T]])
    # gaps [[0.5, 11, 0], [10, 0, nan]]: 10 itself is clipped, NaN is clipped
    out = clip_token_mask(student, teacher, mask, clip_range=10)
    assert out.tolist() == [[T, F, F], [F, F, F]]
    out = clip_token_mask(student, teacher, mask, clip_range=20)
    assert out.tolist() == [[T, T, F], [T, F, F]]
    none = clip_token_mask(student, teacher, mask, clip_range=None)
    assert torch.equal(none, mask) and none is not mask
    with pytest.raises(ValueError, match="clip_range"):
        clip_token_mask(student, teacher, mask, clip_range=0)
    with pytest.raises(ValueError, match="shapes"):
        clip_token_mask(student, teacher[:, :2], mask, clip_range=10)


# ----------------------------------------------------------------- calibration_stats


def test_group_pass_rates():
    rates, ids = group_pass_rates(torch.tensor([T, F, F, T, T]), torch.tensor([4, 4, 2, 4, 2]))
    assert ids.tolist() == [2, 4]
    assert rates.tolist() == pytest.approx([0.5, 2 / 3])


def test_calibration_stats_hand_case():
    adv, mask, correct, ids = batch()
    # add an all-correct group 9 and an all-incorrect group 11
    adv = torch.cat([adv, torch.zeros(3, 2)])
    mask = torch.cat([mask, torch.ones(3, 2, dtype=torch.bool)])
    correct = torch.cat([correct, torch.tensor([T, T, F])])
    ids = torch.cat([ids, torch.tensor([9, 9, 11])])
    stats = calibration_stats(adv, mask, correct, ids, delta=0.5)
    assert stats == {
        "order_consistency_rate": 0.5,  # group 3 (1.5) yes, group 7 (-0.25) no
        "num_two_outcome_groups": 2.0,
        "num_groups": 4.0,
        "mean_margin": 0.625,  # (1.5 - 0.25) / 2
        "share_all_correct": 0.25,
        "share_all_incorrect": 0.25,
        # pass rates: group 3 0.5, group 7 0.5, group 9 1.0, group 11 0.0
        "pass_rate_hist_0": 0.25,
        "pass_rate_hist_1": 0.0,
        "pass_rate_hist_2": 0.5,
        "pass_rate_hist_3": 0.0,
        "pass_rate_hist_4": 0.25,
    }
    assert all(type(v) is float for v in stats.values())
    stats = calibration_stats(adv, mask, correct, ids, delta=0.5, mode="mean")
    assert stats["mean_margin"] == 0.875 and stats["order_consistency_rate"] == 0.5
    stats = calibration_stats(adv, mask, correct, ids, delta=0.5, num_pass_rate_bins=2)
    assert [stats["pass_rate_hist_0"], stats["pass_rate_hist_1"]] == [0.25, 0.75]


def test_calibration_stats_without_two_outcome_groups():
    adv, mask, correct, ids = one_token([1.0, 2.0, 3.0], [T, T, F], ids=[0, 0, 1])
    stats = calibration_stats(adv, mask, correct, ids, delta=0.5)
    assert stats["order_consistency_rate"] == 1.0
    assert stats["num_two_outcome_groups"] == 0.0
    assert stats["mean_margin"] == 0.0
    assert stats["share_all_correct"] == 0.5 and stats["share_all_incorrect"] == 0.5


def test_calibration_stats_empty_batch():
    empty = torch.zeros(0, 3)
    stats = calibration_stats(
        empty, empty.bool(), torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.long),
        delta=0.5,
    )
    assert stats["num_groups"] == 0.0 and stats["order_consistency_rate"] == 1.0
    assert stats["pass_rate_hist_0"] == 0.0


# --------------------------------------------------------------------- property test


@st.composite
def batches(draw):
    b = draw(st.integers(1, 8))
    t = draw(st.integers(1, 4))
    value = st.floats(-5, 5, allow_nan=False, width=32)
    adv = torch.tensor(
        draw(st.lists(st.lists(value, min_size=t, max_size=t), min_size=b, max_size=b))
    )
    mask = torch.tensor(
        draw(st.lists(st.lists(st.booleans(), min_size=t, max_size=t), min_size=b, max_size=b))
    )
    correct = torch.tensor(draw(st.lists(st.booleans(), min_size=b, max_size=b)))
    ids = torch.tensor(draw(st.lists(st.integers(0, 2), min_size=b, max_size=b)))
    return adv, mask, correct, ids


@settings(max_examples=150, deadline=None)
@given(
    data=batches(),
    delta=st.floats(0.01, 2.0),
    mode=st.sampled_from(["minmax", "mean"]),
    direction=st.sampled_from(["correct_up", "incorrect_down", "both"]),
    scope=st.sampled_from(["group", "global"]),
)
def test_property_margin_shift_restores_order(data, delta, mode, direction, scope):
    adv, mask, correct, ids = data
    before = adv.clone()
    out = margin_shift(
        adv, mask, correct, ids, delta=delta, mode=mode, direction=direction, scope=scope
    )
    assert torch.equal(adv, before)
    assert torch.equal(out[~mask], adv[~mask])
    scope_ids = torch.zeros_like(ids) if scope == "global" else ids
    margin_G, has_G, _ = group_margins(
        sequence_returns(out, mask), correct, scope_ids, mode=mode, valid_B=mask.any(-1)
    )
    assert bool((margin_G[has_G] >= delta - 1e-5).all())

    # the group mask keeps only order-consistent two-outcome groups
    keep = margin_mask(adv, mask, correct, ids, delta=delta, mode=mode)
    margin_G, has_G, _ = group_margins(
        sequence_returns(adv[keep], mask[keep]), correct[keep], ids[keep], mode=mode,
        valid_B=mask[keep].any(-1),
    )
    assert bool((margin_G[has_G] >= delta).all())
