"""Teacher side of Uni-OPD: outcome-guided margin calibration of token advantages.

For a prompt q and one of its rollouts τ with response tokens t = 1..|τ|:

    A_t(q, τ) = log πT(y_t | ·) − log πS(y_t | ·)          token advantage
    G(q, τ)   = (1/|τ|) · Σ_t A_t(q, τ)                      distillation return
    S+(q), S−(q) = correct / incorrect rollouts of q (verifier outcome)

    minmax:  m(q) = min_{τ∈S+} G(q, τ) − max_{τ∈S−} G(q, τ)
    mean:    m(q) = mean_{τ∈S+} G(q, τ) − mean_{τ∈S−} G(q, τ)

The teacher is order-consistent with the outcome on q when m(q) ≥ δ (δ > 0).

* Margin shift: where m(q) < δ add λ = δ − m(q) to every valid token of the correct
  rollouts (`correct_up`), subtract it from the incorrect ones (`incorrect_down`), or
  move each side by λ/2 (`both`). A constant c added to every token moves G by exactly
  c, so afterwards m(q) = δ for the shifted groups (up to float rounding).
* Margin mask: drop rollouts that violate the order: the whole group (`group`, the
  paper) or, greedily, the worst offenders one at a time (`greedy`, the released code).
* `scope="global"` (released code) treats the whole batch as one group, for both.
* Token clip: drop tokens with |log πS − log πT| ≥ clip_range (the released code: 10).

`calibrate_advantages` is the whole teacher-side path of a step, in the released
code's order (github WenjinHou/Uni-OPD @08fcec0, miles/backends/training_utils/loss.py):

    1. a row whose teacher call failed gets token advantages 0 (the release fills its
       teacher log-probs with a −100 sentinel and multiplies the advantage by
       (logp_T != −100)); it still takes part in margins with G = 0, as in the release,
       and leaves the loss. Pass known_B=False for it as well to keep it out of margins.
    2. G over ALL valid response tokens, margins, shift or mask (Uni_OPD_utils/
       margin_calibration: opd_correctness_margin_shift / opd_correctness_margin_mask);
    3. only then the log-ratio clip: tokens with |log πS − log πT| ≥ clip leave the loss
       (the release multiplies pg_loss by that mask in policy_loss_function).
    Rollouts whose outcome is unknown (verifier undecided; `response_correct is None`
    in the release) count in neither S+ nor S− and are never shifted or greedily masked.

Where the code departs from the paper or the release, and why:

* Rollouts whose mask has no valid token have G = 0 by convention but carry no token
  that a shift could move, so they are ignored when margins are computed (they count
  neither in S+ nor in S−) and are never shifted. (In the release such a row's
  `adv.mean()` is NaN: torch min/mean then make the group's margin NaN and its shift
  is skipped, while the multi-rank minmax path's Python min() ignores it.) A group
  "has a margin" when it has at least one *valid* correct and one *valid* incorrect rollout.
  Groups without a margin (all correct, all incorrect, or one side only empty or
  unknown rollouts) are left as they are.
* Returns and margins are computed in at least float32 so bf16 advantages do not round
  the margin; the shift is cast back to the advantage dtype.
* Greedy mask, as the release (`_greedy_mask_local`): each step compares dropping the
  lowest-G correct rollout with dropping the highest-G incorrect one and takes the one
  whose new margin is strictly larger than the current one and than the other's; on a
  tie the CORRECT rollout is dropped (the release tests the correct side first and
  replaces it only on a strictly larger margin). Among rollouts with equal G the lower
  batch index is dropped first (stable sorts, as the release). The loop stops when
  m ≥ δ, no drop raises m, or each side is at its floor max(1, floor(n·ratio)); the
  rest is kept. Empty rollouts are never candidates and always kept. The floor adds
  1e-9 before flooring (100 · 0.29 gives 29, the release's int() gives 28).
* The release's single-process fallback (parallel_state None, scope="global") always
  shifts `correct_up` whatever the direction; its training path (all-reduce) honours
  the direction, and so does this module.

All functions are pure: inputs are never modified in place.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "GroupMargins",
    "calibration_stats",
    "clip_token_mask",
    "group_index",
    "group_margins",
    "group_pass_rates",
    "margin_mask",
    "margin_shift",
    "margin_shift_amounts",
    "sequence_returns",
]

_MODES = ("minmax", "mean")
_DIRECTIONS = ("correct_up", "incorrect_down", "both")
_SCOPES = ("group", "global")
_STRATEGIES = ("group", "greedy")
_METHODS = ("shift", "mask")


class GroupMargins(NamedTuple):
    """Per-group margins; unpacks as `(margin_G, has_margin_G, group_ids_G)`.

    margin_G:     float [G], m(q); 0.0 where the group has no margin.
    has_margin_G: bool [G], the group has a valid correct and a valid incorrect rollout.
    group_ids_G:  long [G], the group ids, sorted ascending (row g of the other tensors).
    """

    margin_G: Tensor
    has_margin_G: Tensor
    group_ids_G: Tensor


# ---------------------------------------------------------------------------- helpers


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _check_delta(delta: float) -> None:
    if not (delta > 0):  # also rejects NaN
        raise ValueError(f"delta must be > 0, got {delta!r}")


def _check_rollouts(correct_B: Tensor, group_ids_B: Tensor, batch: int | None = None) -> None:
    if correct_B.dim() != 1 or group_ids_B.dim() != 1:
        raise ValueError(
            f"correct_B and group_ids_B must be 1-D, got shapes "
            f"{tuple(correct_B.shape)} and {tuple(group_ids_B.shape)}"
        )
    if correct_B.shape[0] != group_ids_B.shape[0]:
        raise ValueError(
            f"correct_B has {correct_B.shape[0]} rows but group_ids_B has {group_ids_B.shape[0]}"
        )
    if batch is not None and correct_B.shape[0] != batch:
        raise ValueError(f"correct_B has {correct_B.shape[0]} rows, token tensors have {batch}")


def _check_tokens(token_adv_BT: Tensor, mask_BT: Tensor) -> None:
    if token_adv_BT.dim() != 2 or token_adv_BT.shape != mask_BT.shape:
        raise ValueError(
            f"token_adv_BT and mask_BT must be 2-D with equal shapes, got "
            f"{tuple(token_adv_BT.shape)} and {tuple(mask_BT.shape)}"
        )


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 stays float64; bf16/fp16 are lifted so margins do not round to the grid.
    return torch.promote_types(dtype, torch.float32)


def group_index(group_ids_B: Tensor) -> tuple[Tensor, Tensor]:
    """Map arbitrary group ids to rows 0..G-1.

    group_ids_B: long [B] -> (group_ids_G long [G] sorted ascending, index_B long [B])
    with group_ids_G[index_B] == group_ids_B.
    """
    group_ids_G, index_B = torch.unique(group_ids_B, sorted=True, return_inverse=True)
    return group_ids_G, index_B


def _known(known_B: Tensor | None, correct_B: Tensor) -> Tensor:
    if known_B is None:
        return torch.ones_like(correct_B, dtype=torch.bool)
    if known_B.shape != correct_B.shape:
        raise ValueError(f"known_B has shape {tuple(known_B.shape)}, correct_B {tuple(correct_B.shape)}")
    return known_B.bool()


def _prepare(
    token_adv_BT: Tensor,
    mask_BT: Tensor,
    correct_B: Tensor,
    group_ids_B: Tensor,
    known_B: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mask_BT, correct_B, returns_B, valid_B); valid = has a valid token and a known outcome."""
    _check_tokens(token_adv_BT, mask_BT)
    _check_rollouts(correct_B, group_ids_B, token_adv_BT.shape[0])
    mask_BT = mask_BT.bool()
    correct_B = correct_B.bool()
    returns_B = sequence_returns(token_adv_BT, mask_BT)
    valid_B = mask_BT.any(dim=-1) & _known(known_B, correct_B)
    return mask_BT, correct_B, returns_B, valid_B


# ------------------------------------------------------------------------ public API


def sequence_returns(token_adv_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Distillation return G: the masked mean of the token advantages per row.

    token_adv_BT: float [B, T]; mask_BT: bool [B, T] -> float [B] (at least float32).
    A row with no valid token returns 0.0.
    """
    _check_tokens(token_adv_BT, mask_BT)
    mask_f = mask_BT.to(_work_dtype(token_adv_BT.dtype))
    # where() instead of a product: a masked-out -inf/NaN must not leak into the sum.
    adv = torch.where(mask_BT.bool(), token_adv_BT.to(mask_f.dtype), torch.zeros_like(mask_f))
    count_B = mask_f.sum(dim=-1)
    return adv.sum(dim=-1) / count_B.clamp(min=1.0)


def group_margins(
    returns_B: Tensor,
    correct_B: Tensor,
    group_ids_B: Tensor,
    *,
    mode: str = "minmax",
    valid_B: Tensor | None = None,
) -> GroupMargins:
    """Margin m(q) of every group, vectorised with scatter_reduce over group ids.

    returns_B: float [B], G per rollout; correct_B: bool [B]; group_ids_B: long [B];
    valid_B: bool [B] or None (all valid), rollouts that take part in the margin
    (callers pass "has at least one valid token").
    Returns GroupMargins(margin_G float [G], has_margin_G bool [G], group_ids_G long [G]).
    """
    _check_choice("mode", mode, _MODES)
    _check_rollouts(correct_B, group_ids_B, returns_B.shape[0])
    correct_B = correct_B.bool()
    if valid_B is None:
        valid_B = torch.ones_like(correct_B)
    group_ids_G, index_B = group_index(group_ids_B)
    num_groups = group_ids_G.shape[0]
    returns_B = returns_B.to(_work_dtype(returns_B.dtype))

    pos_B = correct_B & valid_B.bool()
    neg_B = ~correct_B & valid_B.bool()
    n_pos_G = torch.bincount(index_B[pos_B], minlength=num_groups)
    n_neg_G = torch.bincount(index_B[neg_B], minlength=num_groups)
    has_margin_G = (n_pos_G > 0) & (n_neg_G > 0)

    if mode == "minmax":
        inf = torch.full((num_groups,), float("inf"), dtype=returns_B.dtype)
        pos_G = inf.scatter_reduce(0, index_B[pos_B], returns_B[pos_B], reduce="amin")
        neg_G = (-inf).scatter_reduce(0, index_B[neg_B], returns_B[neg_B], reduce="amax")
    else:
        zeros = torch.zeros(num_groups, dtype=returns_B.dtype)
        pos_G = zeros.index_add(0, index_B[pos_B], returns_B[pos_B]) / n_pos_G.clamp(min=1)
        neg_G = zeros.index_add(0, index_B[neg_B], returns_B[neg_B]) / n_neg_G.clamp(min=1)

    # 0.0, not NaN/inf, for groups without a margin: callers mask with has_margin_G and
    # a stray inf would poison sums in logging.
    margin_G = torch.where(has_margin_G, pos_G - neg_G, torch.zeros_like(pos_G))
    return GroupMargins(margin_G, has_margin_G, group_ids_G)


def _shift_plan(
    token_adv_BT: Tensor,
    mask_BT: Tensor,
    correct_B: Tensor,
    group_ids_B: Tensor,
    *,
    delta: float,
    mode: str,
    scope: str,
    known_B: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(lambda_G, index_B, mask_BT, correct_B) shared by margin_shift and its amounts."""
    _check_delta(delta)
    _check_choice("mode", mode, _MODES)
    _check_choice("scope", scope, _SCOPES)
    mask_BT, correct_B, returns_B, valid_B = _prepare(
        token_adv_BT, mask_BT, correct_B, group_ids_B, known_B
    )
    if scope == "global":
        group_ids_B = torch.zeros_like(group_ids_B)
    margin_G, has_margin_G, _ = group_margins(
        returns_B, correct_B, group_ids_B, mode=mode, valid_B=valid_B
    )
    _, index_B = group_index(group_ids_B)
    lambda_G = torch.where(
        has_margin_G, (delta - margin_G).clamp(min=0.0), torch.zeros_like(margin_G)
    )
    return lambda_G, index_B, mask_BT, correct_B


def margin_shift_amounts(
    token_adv_BT: Tensor,
    mask_BT: Tensor,
    correct_B: Tensor,
    group_ids_B: Tensor,
    *,
    delta: float,
    mode: str = "minmax",
    scope: str = "group",
    known_B: Tensor | None = None,
) -> Tensor:
    """λ = max(0, δ − m) per group, the amount margin_shift applies (for metrics).

    Same inputs as margin_shift -> float [G], rows in ascending group-id order
    (G = 1 for scope="global"); 0.0 for groups without a margin or with m ≥ δ.
    Share shifted = (λ_G > 0).float().mean(); with direction="both" each side moves λ/2.
    """
    lambda_G, _, _, _ = _shift_plan(
        token_adv_BT, mask_BT, correct_B, group_ids_B, delta=delta, mode=mode, scope=scope,
        known_B=known_B,
    )
    return lambda_G


def margin_shift(
    token_adv_BT: Tensor,
    mask_BT: Tensor,
    correct_B: Tensor,
    group_ids_B: Tensor,
    *,
    delta: float,
    mode: str = "minmax",
    direction: str = "correct_up",
    scope: str = "group",
    known_B: Tensor | None = None,
) -> Tensor:
    """Shift token advantages so every group with both outcomes gets m ≥ δ.

    token_adv_BT: float [B, T]; mask_BT: bool [B, T]; correct_B: bool [B];
    group_ids_B: long [B]; known_B: bool [B] or None (all known): rows with an unknown
    outcome take no part in margins and are not shifted -> float [B, T], a new tensor
    of token_adv_BT's dtype. Masked-out tokens are returned bit-for-bit unchanged.
    """
    _check_choice("direction", direction, _DIRECTIONS)
    lambda_G, index_B, mask_BT, correct_B = _shift_plan(
        token_adv_BT, mask_BT, correct_B, group_ids_B, delta=delta, mode=mode, scope=scope,
        known_B=known_B,
    )
    lambda_B = lambda_G[index_B]
    zero_B = torch.zeros_like(lambda_B)
    if direction == "correct_up":
        shift_B = torch.where(correct_B, lambda_B, zero_B)
    elif direction == "incorrect_down":
        shift_B = torch.where(correct_B, zero_B, -lambda_B)
    else:
        shift_B = torch.where(correct_B, lambda_B / 2, -lambda_B / 2)
    if known_B is not None:
        shift_B = torch.where(known_B.bool(), shift_B, zero_B)
    shifted_BT = (token_adv_BT.to(lambda_B.dtype) + shift_B[:, None]).to(token_adv_BT.dtype)
    return torch.where(mask_BT, shifted_BT, token_adv_BT)


def _greedy_drops(
    pos_vals: list[float],
    neg_vals: list[float],
    *,
    delta: float,
    mode: str,
    min_retain_ratio: float,
) -> tuple[int, int]:
    """How many to drop from the front of pos_vals (ascending) and neg_vals (descending).

    Dropping the lowest correct / highest incorrect G is the best single drop on each
    side in both modes, so the search only needs two counters.
    """
    n_pos, n_neg = len(pos_vals), len(neg_vals)
    # The epsilon keeps e.g. 100 * 0.29 = 28.999... from flooring to 28.
    floor_pos = max(1, math.floor(n_pos * min_retain_ratio + 1e-9))
    floor_neg = max(1, math.floor(n_neg * min_retain_ratio + 1e-9))

    def margin(i: int, j: int) -> float:
        kept_pos, kept_neg = pos_vals[i:], neg_vals[j:]
        if mode == "minmax":
            return kept_pos[0] - kept_neg[0]
        return sum(kept_pos) / len(kept_pos) - sum(kept_neg) / len(kept_neg)

    # The release's rule (_greedy_mask_local): a drop must raise m strictly; the
    # correct side is tested first and loses only to a strictly larger margin.
    i = j = 0
    current = margin(i, j)
    while current < delta:
        best, action = current, None
        if n_pos - i - 1 >= floor_pos:
            after = margin(i + 1, j)
            if after > best:
                best, action = after, "pos"
        if n_neg - j - 1 >= floor_neg:
            after = margin(i, j + 1)
            if after > best:
                best, action = after, "neg"
        if action is None:
            break
        if action == "pos":
            i += 1
        else:
            j += 1
        current = best
    return i, j


def margin_mask(
    token_adv_BT: Tensor,
    mask_BT: Tensor,
    correct_B: Tensor,
    group_ids_B: Tensor,
    *,
    delta: float,
    mode: str = "minmax",
    strategy: str = "group",
    min_retain_ratio: float = 0.25,
    scope: str = "group",
    known_B: Tensor | None = None,
) -> Tensor:
    """Which rollouts to keep (True) so that kept groups are order-consistent.

    token_adv_BT: float [B, T]; mask_BT: bool [B, T]; correct_B: bool [B];
    group_ids_B: long [B]; known_B: bool [B] or None (all known) -> bool [B].
    strategy="group": drop every rollout of a group with m < δ.
    strategy="greedy": per violating group drop the lowest-G correct or highest-G
    incorrect rollout, whichever raises m more (the correct one on a tie), until m ≥ δ,
    no drop raises m, or a side would fall below max(1, floor(n_side · min_retain_ratio)).
    scope="global": the whole batch is one group. Groups without both outcomes are kept
    whole; rows with an unknown outcome or no valid token are never greedy candidates.
    """
    _check_delta(delta)
    _check_choice("mode", mode, _MODES)
    _check_choice("strategy", strategy, _STRATEGIES)
    _check_choice("scope", scope, _SCOPES)
    if not (0.0 <= min_retain_ratio <= 1.0):
        raise ValueError(f"min_retain_ratio must be in [0, 1], got {min_retain_ratio!r}")
    mask_BT, correct_B, returns_B, valid_B = _prepare(
        token_adv_BT, mask_BT, correct_B, group_ids_B, known_B
    )
    if scope == "global":
        group_ids_B = torch.zeros_like(group_ids_B)
    margin_G, has_margin_G, _ = group_margins(
        returns_B, correct_B, group_ids_B, mode=mode, valid_B=valid_B
    )
    _, index_B = group_index(group_ids_B)
    violating_G = has_margin_G & (margin_G < delta)
    if strategy == "group":
        return ~violating_G[index_B]

    keep_B = torch.ones_like(correct_B)
    returns = returns_B.tolist()
    for g in violating_G.nonzero().flatten().tolist():
        rows = (index_B == g).nonzero().flatten().tolist()
        pos = [r for r in rows if correct_B[r] and valid_B[r]]
        neg = [r for r in rows if not correct_B[r] and valid_B[r]]
        # Stable sorts: among equal G the lower batch index is dropped first.
        pos.sort(key=lambda r: returns[r])
        neg.sort(key=lambda r: -returns[r])
        drop_pos, drop_neg = _greedy_drops(
            [returns[r] for r in pos],
            [returns[r] for r in neg],
            delta=delta,
            mode=mode,
            min_retain_ratio=min_retain_ratio,
        )
        for r in pos[:drop_pos] + neg[:drop_neg]:
            keep_B[r] = False
    return keep_B


def clip_token_mask(
    student_logp_BT: Tensor,
    teacher_logp_BT: Tensor,
    mask_BT: Tensor,
    *,
    clip_range: float | None,
) -> Tensor:
    """Mask out tokens where |log πS − log πT| ≥ clip_range.

    student_logp_BT, teacher_logp_BT: float [B, T]; mask_BT: bool [B, T] -> bool [B, T].
    clip_range=None returns a copy of mask_BT. Tokens whose gap is NaN are masked too
    (the test is "gap < clip_range", which NaN fails).
    """
    if student_logp_BT.shape != teacher_logp_BT.shape or student_logp_BT.shape != mask_BT.shape:
        raise ValueError(
            f"shapes differ: student {tuple(student_logp_BT.shape)}, teacher "
            f"{tuple(teacher_logp_BT.shape)}, mask {tuple(mask_BT.shape)}"
        )
    if clip_range is None:
        return mask_BT.bool().clone()
    if not (clip_range > 0):
        raise ValueError(f"clip_range must be > 0 or None, got {clip_range!r}")
    gap_BT = (student_logp_BT.float() - teacher_logp_BT.float()).abs()
    return mask_BT.bool() & (gap_BT < clip_range)


def group_pass_rates(correct_B: Tensor, group_ids_B: Tensor) -> tuple[Tensor, Tensor]:
    """Share of correct rollouts per group.

    correct_B: bool [B]; group_ids_B: long [B] -> (pass_rate_G float [G], group_ids_G long [G]).
    """
    _check_rollouts(correct_B, group_ids_B)
    group_ids_G, index_B = group_index(group_ids_B)
    num_groups = group_ids_G.shape[0]
    n_G = torch.bincount(index_B, minlength=num_groups)
    n_correct_G = torch.bincount(index_B[correct_B.bool()], minlength=num_groups)
    return n_correct_G.float() / n_G.clamp(min=1).float(), group_ids_G


def calibration_stats(
    token_adv_BT: Tensor,
    mask_BT: Tensor,
    correct_B: Tensor,
    group_ids_B: Tensor,
    *,
    delta: float,
    mode: str = "minmax",
    num_pass_rate_bins: int = 5,
    known_B: Tensor | None = None,
) -> dict[str, float]:
    """Scalar metrics of the batch before calibration (every value a plain float).

    order_consistency_rate  share of two-outcome groups with m ≥ δ; 1.0 when there are
                            none (nothing violates; read it with num_two_outcome_groups)
    num_two_outcome_groups  groups with a valid correct and a valid incorrect rollout
    num_groups              all groups
    mean_margin             mean m over two-outcome groups; 0.0 when there are none
    share_all_correct       share of groups whose rollouts are all correct
    share_all_incorrect     share of groups whose rollouts are all incorrect
    pass_rate_hist_{i}      share of groups with pass rate in bin i of
                            num_pass_rate_bins equal bins over [0, 1] (1.0 in the last)

    Outcome shares and pass rates count every rollout whose outcome is known (they
    describe the verifier; groups with no known outcome are left out of the shares and
    the histogram); margins also ignore rollouts with no valid token.
    """
    _check_delta(delta)
    if num_pass_rate_bins < 1:
        raise ValueError(f"num_pass_rate_bins must be >= 1, got {num_pass_rate_bins}")
    mask_BT, correct_B, returns_B, valid_B = _prepare(
        token_adv_BT, mask_BT, correct_B, group_ids_B, known_B
    )
    margin_G, has_margin_G, _ = group_margins(
        returns_B, correct_B, group_ids_B, mode=mode, valid_B=valid_B
    )
    if known_B is None:
        pass_rate_G, _ = group_pass_rates(correct_B, group_ids_B)
        num_groups = int(pass_rate_G.shape[0])
    else:
        known_B = known_B.bool()
        pass_rate_G, _ = group_pass_rates(correct_B[known_B], group_ids_B[known_B])
        num_groups = int(group_index(group_ids_B)[0].shape[0])
    num_rated = int(pass_rate_G.shape[0])
    num_two = int(has_margin_G.sum())

    stats: dict[str, float] = {
        "order_consistency_rate": (
            float((margin_G[has_margin_G] >= delta).float().mean()) if num_two else 1.0
        ),
        "num_two_outcome_groups": float(num_two),
        "num_groups": float(num_groups),
        "mean_margin": float(margin_G[has_margin_G].mean()) if num_two else 0.0,
        "share_all_correct": float((pass_rate_G == 1.0).float().mean()) if num_rated else 0.0,
        "share_all_incorrect": float((pass_rate_G == 0.0).float().mean()) if num_rated else 0.0,
    }
    # Same bins as balance.pass_rate_histogram, including its float nudge at the edges.
    bin_G = (pass_rate_G * num_pass_rate_bins + 1e-6).floor().long()
    bin_G = bin_G.clamp(max=num_pass_rate_bins - 1)
    counts = torch.bincount(bin_G, minlength=num_pass_rate_bins)
    for i, count in enumerate(counts.tolist()):
        stats[f"pass_rate_hist_{i}"] = count / num_rated if num_rated else 0.0
    return stats


# ------------------------------------------------------------- the whole teacher side
