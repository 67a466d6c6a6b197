"""Hand-computed checks of uniopd.algo.balance and the histogram PNG."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from uniopd.algo.balance import (
    difficulty_balance,
    group_outcome_kinds,
    pass_rate_histogram,
    release_balance_weights,
    select_balanced,
)
from uniopd.algo.balance_plot import save_histogram_png

T, F = True, False


# --------------------------------------------------------------- pass_rate_histogram


def test_pass_rate_histogram_bins_and_input_types():
    rates = [0.0, 0.05, 0.1, 0.3, 0.95, 1.0, 0.5]
    # bin 0: 0.0, 0.05 | 1: 0.1 | 3: 0.3 | 5: 0.5 | 9: 0.95, 1.0
    expected = [2, 1, 0, 1, 0, 1, 0, 0, 0, 2]
    assert pass_rate_histogram(rates) == expected
    assert pass_rate_histogram(torch.tensor(rates)) == expected
    assert pass_rate_histogram(np.array(rates)) == expected
    assert pass_rate_histogram(rates, num_bins=2) == [4, 3]  # 0.5 opens the upper bin


def test_pass_rate_histogram_k_over_n_edges():
    # i/8 is exactly the left edge of bin i; 1.0 joins the last bin
    assert pass_rate_histogram([i / 8 for i in range(9)], num_bins=8) == [1] * 7 + [2]
    assert pass_rate_histogram([i / 10 for i in range(11)], num_bins=10) == [1] * 9 + [2]
    assert pass_rate_histogram([0.29], num_bins=100)[29] == 1
    # float32 7/10 is 0.699999988; it still belongs to bin 7
    assert pass_rate_histogram(torch.tensor([0.7], dtype=torch.float32))[7] == 1


def test_pass_rate_histogram_empty():
    assert pass_rate_histogram([], num_bins=3) == [0, 0, 0]


# ---------------------------------------------------------------- difficulty_balance


def pass_rate_histogram_bins(rates, extreme):
    """Bins (of 10) that hold at least one non-extreme prompt."""
    return [min(int(p * 10), 9) for i, p in enumerate(rates) if i not in extreme]


def test_difficulty_balance_hand_case():
    rates = [0.0, 0.0, 0.0, 0.0, 0.3, 0.6, 0.6, 1.0, 1.0]
    # num_bins 4: bin 0 = four 0.0 (extremes), bin 1 = {0.3}, bin 2 = {0.6, 0.6},
    # bin 3 = two 1.0 (extremes). target = 4. Index 4 gets 4 copies, 5 and 6 get 2 each;
    # extremes stay at one copy.
    out = difficulty_balance(rates, num_bins=4, seed=0)
    assert Counter(out) == {0: 1, 1: 1, 2: 1, 3: 1, 4: 4, 5: 2, 6: 2, 7: 1, 8: 1}
    assert pass_rate_histogram([rates[i] for i in out], num_bins=4) == [4, 4, 4, 2]


def test_difficulty_balance_mixed_bin_counts_extremes_toward_target():
    # num_bins 2: bin 0 = {0.0 (extreme), 0.1}, bin 1 = three 0.5; target 3.
    # bin 0 needs 3 - 1 = 2 copies from its single mid prompt.
    out = difficulty_balance([0.0, 0.1, 0.5, 0.5, 0.5], num_bins=2)
    assert Counter(out) == {0: 1, 1: 2, 2: 1, 3: 1, 4: 1}


def test_difficulty_balance_spreads_repeats_evenly():
    # bin 1 has 4 prompts, bin 0 three mids: 4 copies over 3 prompts -> 1, 1, 2
    rates = [0.5] * 4 + [0.1] * 3
    chosen = set()
    for seed in range(20):
        counts = Counter(difficulty_balance(rates, num_bins=2, seed=seed))
        assert [counts[i] for i in range(4)] == [1, 1, 1, 1]
        assert sorted(counts[i] for i in (4, 5, 6)) == [1, 1, 2]
        chosen.add(max((4, 5, 6), key=lambda i: counts[i]))
    assert len(chosen) > 1  # the extra copy is drawn, not always the same prompt


def test_difficulty_balance_every_index_flatter_and_deterministic():
    rng = np.random.default_rng(1)
    rates = np.concatenate(
        [np.zeros(30), np.ones(40), rng.integers(1, 16, size=50) / 16, rng.beta(5, 1, 80)]
    ).clip(0, 1)
    out = difficulty_balance(rates, num_bins=10, seed=3)
    counts = Counter(out)
    assert set(counts) == set(range(len(rates)))  # nothing dropped
    extreme = [i for i, p in enumerate(rates) if p in (0.0, 1.0)]
    assert all(counts[i] == 1 for i in extreme)  # extremes never upsampled
    before = pass_rate_histogram(rates)
    after = pass_rate_histogram(rates[out])
    target = max(before)
    mid_bins = set(pass_rate_histogram_bins(rates, extreme))
    for b, (n_before, n_after) in enumerate(zip(before, after)):
        assert n_after == (target if b in mid_bins else n_before)
    assert np.std(after) < np.std(before)
    assert out == difficulty_balance(rates, num_bins=10, seed=3)
    assert out != difficulty_balance(rates, num_bins=10, seed=4)
    assert sorted(out) != out  # shuffled


def test_difficulty_balance_bins_of_mids_reach_target():
    rates = [0.15, 0.15, 0.15, 0.55, 0.85, 0.85]
    out = difficulty_balance(rates, num_bins=10, seed=0)
    assert pass_rate_histogram([rates[i] for i in out]) == [0, 3, 0, 0, 0, 3, 0, 0, 3, 0]


def test_difficulty_balance_only_extremes_is_identity_up_to_order():
    out = difficulty_balance([0.0, 1.0, 1.0, 0.0, 1.0], seed=5)
    assert sorted(out) == [0, 1, 2, 3, 4]


def test_difficulty_balance_empty_and_tensor_input():
    assert difficulty_balance([]) == []
    assert Counter(difficulty_balance(torch.tensor([0.5, 0.25, 0.25]), num_bins=2)) == {
        0: 2,
        1: 1,
        2: 1,
    }


@pytest.mark.parametrize(
    "rates,match",
    [
        ([0.5, float("nan")], r"pass_rates\[1\]"),
        ([1.2, 0.5], r"pass_rates\[0\]"),
        ([0.5, 0.5, -0.1], r"pass_rates\[2\]"),
        ([[0.5]], "1-D"),
    ],
)
def test_difficulty_balance_validation(rates, match):
    with pytest.raises(ValueError, match=match):
        difficulty_balance(rates)
    with pytest.raises(ValueError, match=match):
        pass_rate_histogram(rates)


def test_num_bins_validation():
    with pytest.raises(ValueError, match="num_bins"):
        difficulty_balance([0.5], num_bins=0)
    with pytest.raises(ValueError, match="num_bins"):
        pass_rate_histogram([0.5], num_bins=-1)


# ------------------------------------------------------------------ select_balanced


def groups():
    # group 10: rows 0-5 correct, 6-7 incorrect; group 20: row 8 correct, 9-13
    # incorrect; group 30: rows 14-15 (fewer than n_per_group)
    correct = torch.tensor([T] * 6 + [F] * 2 + [T] + [F] * 5 + [T, F])
    ids = torch.tensor([10] * 8 + [20] * 6 + [30] * 2)
    return correct, ids


def sides(kept, correct, ids, group):
    rows = [r for r in kept.tolist() if ids[r] == group]
    return sum(bool(correct[r]) for r in rows), sum(not correct[r] for r in rows)


@pytest.mark.parametrize(
    "ratio,n,expected",
    [
        (1.0, 4, {10: (2, 2), 20: (1, 3), 30: (1, 1)}),  # group 20 fills from incorrect
        (3.0, 4, {10: (3, 1), 20: (1, 3), 30: (1, 1)}),
        (0.0, 4, {10: (2, 2), 20: (0, 4), 30: (1, 1)}),  # group 10 fills from correct
        (1e-6, 4, {10: (2, 2), 20: (0, 4), 30: (1, 1)}),
        (float("inf"), 4, {10: (4, 0), 20: (1, 3), 30: (1, 1)}),
        (1.0, 3, {10: (2, 1), 20: (1, 2), 30: (1, 1)}),  # 1.5 rounds half up
        (0.5, 3, {10: (1, 2), 20: (1, 2), 30: (1, 1)}),
    ],
)
def test_select_balanced_ratios(ratio, n, expected):
    correct, ids = groups()
    kept = select_balanced(
        correct, ids, n_per_group=n, ratio=ratio, generator=torch.Generator().manual_seed(0)
    )
    assert kept.dtype == torch.long
    assert kept.tolist() == sorted(set(kept.tolist()))
    assert {g: sides(kept, correct, ids, g) for g in (10, 20, 30)} == expected


def test_select_balanced_keeps_minority_side_whole():
    correct, ids = groups()
    kept = select_balanced(correct, ids, n_per_group=4, generator=torch.Generator().manual_seed(0))
    assert {6, 7, 8, 14, 15} <= set(kept.tolist())


def test_select_balanced_deterministic_for_generator_state():
    correct, ids = groups()

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return select_balanced(correct, ids, n_per_group=4, generator=gen).tolist()

    assert run(0) == run(0)
    assert len({tuple(run(s)) for s in range(10)}) > 1


def test_select_balanced_interleaved_ids():
    correct = torch.tensor([T, F, T, F, T, F, F, T])
    ids = torch.tensor([5, 1, 5, 1, 5, 1, 5, 1])
    kept = select_balanced(correct, ids, n_per_group=2, generator=torch.Generator().manual_seed(1))
    assert sides(kept, correct, ids, 5) == (1, 1) and sides(kept, correct, ids, 1) == (1, 1)
    assert 6 in kept.tolist() and 7 in kept.tolist()  # each the only one of its side


def test_select_balanced_empty_and_validation():
    empty = select_balanced(
        torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.long), n_per_group=2
    )
    assert empty.tolist() == [] and empty.dtype == torch.long
    correct, ids = groups()
    with pytest.raises(ValueError, match="n_per_group"):
        select_balanced(correct, ids, n_per_group=0)
    with pytest.raises(ValueError, match="ratio"):
        select_balanced(correct, ids, n_per_group=2, ratio=-1.0)
    with pytest.raises(ValueError, match="1-D"):
        select_balanced(correct, ids[:3], n_per_group=2)


def test_group_outcome_kinds():
    all_correct, all_incorrect, ids = group_outcome_kinds(
        torch.tensor([T, T, F, F, T, F]), torch.tensor([2, 2, 0, 0, 1, 1])
    )
    assert ids.tolist() == [0, 1, 2]
    assert all_correct.tolist() == [F, F, T]
    assert all_incorrect.tolist() == [T, F, F]


# ------------------------------------------------------------------ save_histogram_png


def test_save_histogram_png(tmp_path):
    path = tmp_path / "plots" / "hist.png"
    out = save_histogram_png([5, 1, 0, 2], [5, 5, 0, 5], path, num_bins=4)
    assert out == path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    save_histogram_png(list(range(12)), [11] * 12, str(path), num_bins=12)  # overwrite
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["hist.png"]  # no tmp left
    with pytest.raises(ValueError, match="counts"):
        save_histogram_png([1, 2], [1, 2, 3], path, num_bins=2)


# ----------------------------------------------------------- release_balance_weights


def release_batch():
    # group 4: 3 correct (rows 0-2), 1 incorrect (3)  -> 2 of rows 0-2 dropped
    # group 1: all correct (4, 5)                      -> nothing dropped
    # group 9: 1 correct (6), 1 incorrect (7), 1 unknown (8), the unknown sits on the
    #          incorrect side: 1 vs 2                  -> 1 of rows 7, 8 dropped
    # group 2: 2 correct (9, 10), 2 incorrect (11, 12) -> nothing dropped
    correct = torch.tensor([T, T, T, F, T, T, T, F, T, T, T, F, F])
    known = torch.tensor([T] * 8 + [F] + [T] * 4)
    ids = torch.tensor([4, 4, 4, 4, 1, 1, 9, 9, 9, 2, 2, 2, 2])
    return correct, known, ids


def test_release_balance_weights_hand_case():
    correct, known, ids = release_batch()
    for seed in range(30):
        w = release_balance_weights(correct, ids, known_B=known,
                                    generator=torch.Generator().manual_seed(seed))
        assert w.dtype == torch.float32 and set(w.tolist()) <= {0.0, 1.0}
        assert w[:3].sum() == 1.0 and w[3] == 1.0
        assert w[4:6].tolist() == [1.0, 1.0]
        assert w[6] == 1.0 and w[7:9].sum() == 1.0
        assert w[9:].tolist() == [1.0] * 4
    # without known_B, row 8 counts as correct: group 9 is 2 vs 1, a correct row goes
    w = release_balance_weights(correct, ids, generator=torch.Generator().manual_seed(0))
    assert w[7] == 1.0 and w[[6, 8]].sum() == 1.0


def test_release_balance_weights_draws_uniformly_and_reproducibly():
    correct, known, ids = release_batch()
    dropped = torch.zeros(len(correct))
    for seed in range(300):
        w = release_balance_weights(correct, ids, known_B=known,
                                    generator=torch.Generator().manual_seed(seed))
        dropped += 1 - w
    # each of rows 0-2 is dropped 2/3 of the time, rows 7, 8 half of the time
    assert all(abs(dropped[r] / 300 - 2 / 3) < 0.1 for r in range(3))
    assert all(abs(dropped[r] / 300 - 0.5) < 0.1 for r in (7, 8))
    a = release_balance_weights(correct, ids, known_B=known, generator=torch.Generator().manual_seed(5))
    b = release_balance_weights(correct, ids, known_B=known, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_release_balance_weights_edge_cases():
    correct, _, ids = release_batch()
    # no known outcome anywhere: the release skips balancing
    none_known = torch.zeros_like(correct)
    assert release_balance_weights(correct, ids, known_B=none_known).tolist() == [1.0] * 13
    empty = torch.zeros(0, dtype=torch.bool)
    assert release_balance_weights(empty, torch.zeros(0, dtype=torch.long)).shape == (0,)
    with pytest.raises(ValueError, match="equal length"):
        release_balance_weights(correct, ids[:3])
    with pytest.raises(ValueError, match="known_B"):
        release_balance_weights(correct, ids, known_B=none_known[:3])
