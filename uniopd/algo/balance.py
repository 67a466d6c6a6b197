"""Student side of Uni-OPD: difficulty-aware (offline) and correctness-aware (online) balancing.

Offline, difficulty-aware. Each prompt has a pass rate p ∈ [0, 1] (share of the
student's rollouts a verifier accepts). Bin i of num_bins covers [i/k, (i+1)/k), with
p = 1.0 in the last bin. Mid-difficulty prompts are under-represented in typical prompt
sets; the paper upsamples them until the pass-rate histogram is flat, dropping nothing.
The released code never included this step, so the exact rule is ours:

    target    = max over bins of the bin's count (all prompts)
    extremes  = prompts with p == 0.0 or p == 1.0 exactly: kept once, never repeated
                (the student always fails / always solves them: on-policy rollouts of
                such a prompt carry no outcome contrast, so repeating them adds cost and
                no order signal)
    bin b     = n_ext extremes + n_mid other prompts; if n_mid > 0 the bin is raised to
                `target` by giving the (target − n_ext) copies to its n_mid prompts as
                evenly as possible: each gets floor or ceil of (target − n_ext) / n_mid,
                the ceil going to prompts drawn without replacement by the seeded RNG.

So every bin that has at least one non-extreme prompt ends at exactly `target`; a bin
of extremes only stays as it is (the flattest the data allows without repeating
extremes). Note that `target` counts extremes too: when always-solved prompts dominate,
the mid prompts are repeated many times; filter such prompts first if that is unwanted.
Bin edges get a 1e-6 nudge so that pass rates like k/n land in the bin one expects
despite float rounding (0.29 · 100 = 28.999999999999996; float32 0.7 is 0.699999988);
only values within 1e-6 / num_bins below an edge move up a bin.

Online, correctness-aware. Each group is oversampled; `select_balanced` keeps
n_per_group rollouts per group with correct : incorrect as close to `ratio` as the
group allows. Closest means: the number of correct rollouts is n · ratio / (1 + ratio)
rounded half up (ratio = inf keeps only correct ones), then capped by what each side
has, the shortfall filled from the other side.

Online, the released rule (`release_balance_weights`): no oversampling; within each
group the larger outcome side is randomly thinned to the smaller side's count, and the
dropped rollouts stay in the batch with loss weight 0 (so they still count in margins).
See that function for what the release leaves uncertain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from uniopd.algo.calibration import group_index

__all__ = [
    "difficulty_balance",
    "group_outcome_kinds",
    "pass_rate_histogram",
    "release_balance_weights",
    "select_balanced",
]

# Nudge for bin edges; see the module docstring.
_EDGE_EPS = 1e-6


def _as_pass_rates(pass_rates: Sequence[float] | Tensor | np.ndarray | Any) -> np.ndarray:
    if isinstance(pass_rates, Tensor):
        pass_rates = pass_rates.detach().cpu().double().numpy()
    rates = np.asarray(pass_rates, dtype=np.float64)
    if rates.ndim != 1:
        raise ValueError(f"pass_rates must be 1-D, got shape {rates.shape}")
    for i, p in enumerate(rates.tolist()):
        if math.isnan(p) or p < 0.0 or p > 1.0:
            raise ValueError(f"pass_rates[{i}] = {p!r} is not a number in [0, 1]")
    return rates


def _check_num_bins(num_bins: int) -> None:
    if not isinstance(num_bins, int | np.integer) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")


def _bin_of(rates: np.ndarray, num_bins: int) -> np.ndarray:
    return np.minimum(np.floor(rates * num_bins + _EDGE_EPS), num_bins - 1).astype(np.int64)


def pass_rate_histogram(
    pass_rates: Sequence[float] | Tensor | np.ndarray, *, num_bins: int = 10
) -> list[int]:
    """Count prompts per pass-rate bin; bin i covers [i/k, (i+1)/k), 1.0 in the last.

    pass_rates: N values in [0, 1] (list, 1-D tensor or ndarray) -> num_bins counts.
    """
    _check_num_bins(num_bins)
    rates = _as_pass_rates(pass_rates)
    return np.bincount(_bin_of(rates, num_bins), minlength=num_bins).tolist()


def difficulty_balance(
    pass_rates: Sequence[float] | Tensor | np.ndarray, *, num_bins: int = 10, seed: int = 0
) -> list[int]:
    """Indices into pass_rates, with repeats, whose pass-rate histogram is flat.

    pass_rates: N values in [0, 1] -> list of indices, every index 0..N-1 at least once,
    mid-difficulty ones repeated per the rule in the module docstring, shuffled with
    `seed` (same seed, same list). Raises ValueError naming the first bad index.
    """
    _check_num_bins(num_bins)
    rates = _as_pass_rates(pass_rates)
    if rates.size == 0:
        return []
    rng = np.random.default_rng(seed)
    bin_N = _bin_of(rates, num_bins)
    extreme_N = (rates == 0.0) | (rates == 1.0)
    target = int(np.bincount(bin_N, minlength=num_bins).max())

    copies_N = np.ones(rates.size, dtype=np.int64)
    for b in range(num_bins):
        mids = np.flatnonzero((bin_N == b) & ~extreme_N)
        if mids.size == 0:
            continue
        n_ext = int(np.count_nonzero((bin_N == b) & extreme_N))
        base, extra = divmod(target - n_ext, mids.size)
        copies_N[mids] = base
        copies_N[rng.choice(mids, size=extra, replace=False)] += 1

    indices = np.repeat(np.arange(rates.size), copies_N)
    return rng.permutation(indices).tolist()


def select_balanced(
    correct_B: Tensor,
    group_ids_B: Tensor,
    *,
    n_per_group: int,
    ratio: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Choose n_per_group rollouts per group with correct:incorrect close to `ratio`.

    correct_B: bool [B]; group_ids_B: long [B] -> long [K], kept batch indices sorted
    ascending. ratio = correct / incorrect (1.0 half and half, 0.0 incorrect only,
    inf correct only). A side with too few rollouts is filled from the other side; a
    group with fewer than n_per_group rollouts keeps all. Which rollouts of a side are
    kept is drawn with `generator` (groups visited in ascending id order), so a
    generator in a given state always gives the same answer.
    """
    if n_per_group < 1:
        raise ValueError(f"n_per_group must be >= 1, got {n_per_group}")
    if not (ratio >= 0.0):  # also rejects NaN
        raise ValueError(f"ratio must be >= 0 (correct / incorrect), got {ratio!r}")
    if correct_B.dim() != 1 or correct_B.shape != group_ids_B.shape:
        raise ValueError(
            f"correct_B and group_ids_B must be 1-D of equal length, got "
            f"{tuple(correct_B.shape)} and {tuple(group_ids_B.shape)}"
        )
    correct_B = correct_B.bool().cpu()
    frac_correct = 1.0 if math.isinf(ratio) else ratio / (1.0 + ratio)
    _, index_B = group_index(group_ids_B.cpu())

    kept: list[Tensor] = []
    for g in range(int(index_B.max()) + 1 if index_B.numel() else 0):
        rows = (index_B == g).nonzero().flatten()
        if rows.numel() <= n_per_group:
            kept.append(rows)
            continue
        pos, neg = rows[correct_B[rows]], rows[~correct_B[rows]]
        n_pos = min(math.floor(n_per_group * frac_correct + 0.5), pos.numel())
        n_neg = min(n_per_group - n_pos, neg.numel())
        n_pos = n_per_group - n_neg  # fill a short incorrect side with correct ones
        kept.append(pos[torch.randperm(pos.numel(), generator=generator)[:n_pos]])
        kept.append(neg[torch.randperm(neg.numel(), generator=generator)[:n_neg]])
    if not kept:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat(kept).sort().values


def release_balance_weights(
    correct_B: Tensor,
    group_ids_B: Tensor,
    *,
    known_B: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Loss weights of the released online balancing: 1.0 keep, 0.0 dropped.

    correct_B: bool [B]; group_ids_B: long [B]; known_B: bool [B] or None (all known)
    -> loss_weight_B float [B] (on correct_B's device), each 0.0 or 1.0.

    The rule of github WenjinHou/Uni-OPD @08fcec0,
    miles/Uni_OPD_utils/online_balance/rollout_sample_balance.py (`_filter_per_group`
    with ratio 1, the launch scripts' FILTER_MODE="sample", FILTER_RATIO="1"): in each
    group, with c correct and i other rollouts, if both c and i are > 0 the larger side
    loses |c − i| rollouts drawn uniformly without replacement; nothing is added or
    resampled. A dropped rollout is not removed: the release sets
    `sample.remove_sample`, which turns its loss mask to zeros (miles/ray/rollout.py)
    while it still enters the advantage computation and the margin statistics.
    As in the release, a rollout whose outcome is unknown sits on the incorrect side
    (it splits on `response_correct is True` / `is not True`), and when no rollout of
    the batch has a known outcome nothing is dropped. Groups are visited in ascending
    id order, so a generator in a given state always gives the same answer.

    Caveat, checked in that commit: as published this function never runs. It reads
    `getattr(args, "filter_rollout_by_response_correct", False)`,
    `getattr(args, "filter_rollout_mode", "global")` and
    `getattr(args, "filter_rollout_ratio", 1.0)`, while miles/miles/utils/arguments.py
    defines `--balance-rollout-by-outcome-reward`, `--balance-rollout-scope`
    (global | sample, default global) and `--balance-rollout-ratio`, and nothing maps
    one set of names to the other; so the flag reads False and it returns at once. The
    launch scripts (exps/scripts/OPD/*/...Uni_OPD.sh) also pass
    `--rollout-sample-filter-path exps.OPD.utils.filter.rollout_sample_filter.filter_function`,
    a module the release does not contain (it has no exps/OPD/ package; other released
    files import exps.OPD.utils.reward.* too, the pre-rename path of Uni_OPD_utils/).
    The paper's runs used that unreleased module, so which rule produced its numbers
    (this one, with per-group scope and ratio 1 as the scripts ask, is the most likely)
    is not certain.
    """
    if correct_B.dim() != 1 or correct_B.shape != group_ids_B.shape:
        raise ValueError(
            f"correct_B and group_ids_B must be 1-D of equal length, got "
            f"{tuple(correct_B.shape)} and {tuple(group_ids_B.shape)}"
        )
    if known_B is not None and known_B.shape != correct_B.shape:
        raise ValueError(f"known_B has shape {tuple(known_B.shape)}, correct_B {tuple(correct_B.shape)}")
    device = correct_B.device
    known = torch.ones_like(correct_B, dtype=torch.bool) if known_B is None else known_B.bool()
    pos_B = (correct_B.bool() & known).cpu()
    weight_B = torch.ones(correct_B.shape[0], dtype=torch.float32)
    if not bool(known.any()):
        return weight_B.to(device)
    _, index_B = group_index(group_ids_B.cpu())
    for g in range(int(index_B.max()) + 1):
        rows = (index_B == g).nonzero().flatten()
        pos, neg = rows[pos_B[rows]], rows[~pos_B[rows]]
        if pos.numel() == 0 or neg.numel() == 0 or pos.numel() == neg.numel():
            continue
        big, small = (pos, neg) if pos.numel() > neg.numel() else (neg, pos)
        order = torch.randperm(big.numel(), generator=generator)
        weight_B[big[order[: big.numel() - small.numel()]]] = 0.0
    return weight_B.to(device)


def group_outcome_kinds(correct_B: Tensor, group_ids_B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Which groups have a single outcome (to resample them).

    correct_B: bool [B]; group_ids_B: long [B] ->
    (all_correct_G bool [G], all_incorrect_G bool [G], group_ids_G long [G] ascending).
    """
    if correct_B.dim() != 1 or correct_B.shape != group_ids_B.shape:
        raise ValueError(
            f"correct_B and group_ids_B must be 1-D of equal length, got "
            f"{tuple(correct_B.shape)} and {tuple(group_ids_B.shape)}"
        )
    group_ids_G, index_B = group_index(group_ids_B)
    num_groups = group_ids_G.shape[0]
    n_G = torch.bincount(index_B, minlength=num_groups)
    n_correct_G = torch.bincount(index_B[correct_B.bool()], minlength=num_groups)
    return n_correct_G == n_G, n_correct_G == 0, group_ids_G
