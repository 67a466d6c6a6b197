"""The teacher side of one step, exactly as the trainer runs it, in the authors' release's
order (github WenjinHou/Uni-OPD, miles `loss.py: compute_advantages_and_returns` and
`policy_loss_function`):

1. rows whose teacher call failed get advantage 0 (they keep G = 0 in the margins);
2. each rollout's return G is the mean of its advantages over ALL its response tokens, and
   margin shift or mask (`uniopd.algo.calibration`) is applied on those returns;
3. only then are tokens with |log πS − log πT| ≥ clip dropped from the loss.

The paper's G (a mean over the trajectory's tokens) matches this order. Earlier uniopd
clipped first and computed G over the surviving tokens; the two differ in most batches with
a clipped token. Rows with an unknown outcome are in neither side of any margin, as in the
release; rows with no response token are ignored in margins (the release gets NaN there).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from uniopd.algo.calibration import (
    _METHODS,
    _check_choice,
    _check_tokens,
    _known,
    calibration_stats,
    clip_token_mask,
    margin_mask,
    margin_shift,
    sequence_returns,
)

__all__ = ["CalibrationResult", "calibrate_advantages", "outcome_advantage_means"]


class CalibrationResult(NamedTuple):
    """What `calibrate_advantages` returns.

    adv_BT:       float [B, T], calibrated token advantages; 0 outside loss_mask_BT.
    loss_mask_BT: bool [B, T], response tokens that enter the loss: mask_BT minus the
                  log-ratio-clipped tokens and the rows whose teacher call failed.
    keep_B:       bool [B], rows the margin mask keeps (all True for shift / disabled);
                  the loss uses loss_mask_BT & keep_B[:, None].
    metrics:      dict[str, float], see calibrate_advantages.
    """

    adv_BT: Tensor
    loss_mask_BT: Tensor
    keep_B: Tensor
    metrics: dict[str, float]


def outcome_advantage_means(
    adv_BT: Tensor,
    mask_BT: Tensor,
    correct_B: Tensor,
    *,
    keep_B: Tensor | None = None,
    known_B: Tensor | None = None,
) -> dict[str, float]:
    """The release's `advantages/correct`, `advantages/incorrect` and their difference.

    adv_BT: float [B, T] calibrated advantages before the log-ratio clip; mask_BT: bool
    [B, T] response tokens; correct_B, keep_B, known_B: bool [B] -> dict of floats.
    As miles/backends/training_utils/log_utils.py:_collect_correctness_advantages: a
    per-sample mean, not a token mean: each row's mean token advantage over its response
    tokens, averaged over the rows of that outcome. Rows with an unknown outcome are left
    out, and so are rows whose advantages are all exactly 0 (in the release: greedily
    masked rows, whose advantages it zeroes; failed-teacher rows nothing shifted; empty
    rows). Here rows with keep_B False are left out too (the release zeroes them).
    A key is absent when its side has no row, as in the release.
    """
    _check_tokens(adv_BT, mask_BT)
    mask_BT = mask_BT.bool()
    correct_B = correct_B.bool()
    nonzero_B = (torch.where(mask_BT, adv_BT, torch.zeros_like(adv_BT)) != 0).any(dim=-1)
    use_B = nonzero_B & _known(known_B, correct_B)
    if keep_B is not None:
        use_B = use_B & keep_B.bool()
    means = sequence_returns(adv_BT, mask_BT).double()
    out: dict[str, float] = {}
    for name, side_B in (("correct", correct_B), ("incorrect", ~correct_B)):
        rows_B = use_B & side_B
        if bool(rows_B.any()):
            out[f"advantages/{name}"] = float(means[rows_B].sum()) / int(rows_B.sum())
    if len(out) == 2:
        out["advantages/correct_minus_incorrect"] = (
            out["advantages/correct"] - out["advantages/incorrect"]
        )
    return out


def calibrate_advantages(
    token_adv_BT: Tensor,
    student_logp_BT: Tensor,
    teacher_logp_BT: Tensor,
    mask_BT: Tensor,
    correct_B: Tensor,
    group_ids_B: Tensor,
    *,
    enabled: bool,
    method: str,
    delta: float,
    mode: str = "minmax",
    direction: str = "correct_up",
    scope: str = "group",
    mask_strategy: str = "group",
    min_retain_ratio: float = 0.25,
    logratio_clip: float | None = None,
    known_B: Tensor | None = None,
    teacher_ok_B: Tensor | None = None,
) -> CalibrationResult:
    """The teacher side of one step, in the release's order (see the module docstring).

    token_adv_BT, student_logp_BT, teacher_logp_BT: float [B, T], the advantages
    log πT − log πS (0 outside mask_BT) and the log-probs the clip compares;
    mask_BT: bool [B, T] response tokens; correct_B: bool [B]; group_ids_B: long [B];
    known_B: bool [B] or None (every outcome known); teacher_ok_B: bool [B] or None
    (every teacher call succeeded) -> CalibrationResult.

    1. rows with teacher_ok_B False get advantage 0 (they keep G = 0 in margins);
    2. G over every token of mask_BT, then margin shift or mask (`scope`, `direction`,
       `mask_strategy` as in margin_shift / margin_mask) when `enabled`;
    3. tokens with |log πS − log πT| ≥ logratio_clip and failed-teacher rows leave
       loss_mask_BT; adv_BT is 0 outside it.

    metrics: `calib/<calibration_stats>` (before calibration) with `pass_rate_hist_*`
    and `share_all_*` under `balance/`; shift: `calib/shifted_group_frac`,
    `calib/mean_shift`; mask: `calib/masked_group_frac`, `calib/masked_rollout_frac`;
    when enabled, `calib/mean_margin_after` and `calib/order_consistency_rate_after` (the
    same statistics over the calibrated returns of the rollouts kept); and
    `outcome_advantage_means` of the calibrated, unclipped advantages.
    With logratio_clip, known_B and teacher_ok_B all None the result equals the old
    clip-first path bit for bit (there the clip was a no-op).
    """
    _check_tokens(token_adv_BT, mask_BT)
    if student_logp_BT.shape != token_adv_BT.shape or teacher_logp_BT.shape != token_adv_BT.shape:
        raise ValueError(
            f"shapes differ: advantages {tuple(token_adv_BT.shape)}, student "
            f"{tuple(student_logp_BT.shape)}, teacher {tuple(teacher_logp_BT.shape)}"
        )
    _check_choice("method", method, _METHODS)
    mask_BT = mask_BT.bool()
    correct_B = correct_B.bool()
    known = None if known_B is None else _known(known_B, correct_B)
    adv_BT = token_adv_BT
    if teacher_ok_B is not None:
        ok_B = _known(teacher_ok_B, correct_B)
        adv_BT = torch.where(ok_B[:, None], adv_BT, torch.zeros_like(adv_BT))

    stats = calibration_stats(
        adv_BT, mask_BT, correct_B, group_ids_B, delta=delta, mode=mode, known_B=known
    )
    metrics = {
        (f"balance/{k}" if k.startswith(("pass_rate_hist", "share_all")) else f"calib/{k}"): float(v)
        for k, v in stats.items()
    }
    keep_B = torch.ones(correct_B.shape[0], dtype=torch.bool)
    calibrated_BT = adv_BT
    num_groups = max(len(group_ids_B.unique()), 1)
    if enabled and method == "shift":
        calibrated_BT = margin_shift(
            adv_BT, mask_BT, correct_B, group_ids_B, delta=delta, mode=mode,
            direction=direction, scope=scope, known_B=known,
        )
        moved_BT = sequence_returns(calibrated_BT, mask_BT) - sequence_returns(adv_BT, mask_BT)
        delta_B = moved_BT.abs()
        moved_B = delta_B > 1e-7
        metrics["calib/shifted_group_frac"] = len(group_ids_B[moved_B].unique()) / num_groups
        metrics["calib/mean_shift"] = float(delta_B[moved_B].mean()) if moved_B.any() else 0.0
    elif enabled:
        keep_B = margin_mask(
            adv_BT, mask_BT, correct_B, group_ids_B, delta=delta, mode=mode,
            strategy=mask_strategy, min_retain_ratio=min_retain_ratio, scope=scope, known_B=known,
        )
        metrics["calib/masked_group_frac"] = len(group_ids_B[~keep_B].unique()) / num_groups
        metrics["calib/masked_rollout_frac"] = float((~keep_B).float().mean())
    if enabled:
        # The same statistics after calibration, over the rollouts the loss keeps: how far
        # the shift or mask moved the margins toward δ.
        kept_B = keep_B if known is None else keep_B & known
        # A shift lands a margin on δ itself, up to rounding: compare with a hair below δ.
        after = calibration_stats(
            calibrated_BT, mask_BT, correct_B, group_ids_B, delta=delta - 1e-5, mode=mode, known_B=kept_B
        )
        metrics["calib/mean_margin_after"] = after["mean_margin"]
        metrics["calib/order_consistency_rate_after"] = after["order_consistency_rate"]
    metrics.update(
        outcome_advantage_means(calibrated_BT, mask_BT, correct_B, keep_B=keep_B, known_B=known)
    )

    loss_mask_BT = clip_token_mask(
        student_logp_BT, teacher_logp_BT, mask_BT, clip_range=logratio_clip
    )
    if teacher_ok_B is not None:
        loss_mask_BT = loss_mask_BT & ok_B[:, None]
    out_BT = torch.where(loss_mask_BT, calibrated_BT, torch.zeros_like(calibrated_BT))
    return CalibrationResult(out_BT, loss_mask_BT, keep_B, metrics)
