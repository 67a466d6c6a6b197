"""Apply the configured teacher-side calibration to a step's token advantages.

Order: (1) optional log-ratio clip mask (|log πS − log πT| ≥ clip drops the token);
(2) metrics on the raw advantages (order consistency before calibration);
(3) margin shift or margin mask (`uniopd.algo.calibration`).
"""

from __future__ import annotations

import torch

from uniopd.algo import calibration as C
from uniopd.batch import StepBatch
from uniopd.config import CalibrationConfig


def calibrate(adv_BT: torch.Tensor, batch: StepBatch,
              cfg: CalibrationConfig) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """(calibrated adv_BT, keep_B rows that train, metrics)."""
    mask_BT = batch.mask_BT
    if cfg.logratio_clip is not None:
        mask_BT = C.clip_token_mask(batch.old_logp_BT, batch.teacher_logp_BT, mask_BT, clip_range=cfg.logratio_clip)
        batch.mask_BT = mask_BT
        adv_BT = torch.where(mask_BT, adv_BT, torch.zeros_like(adv_BT))
    stats = C.calibration_stats(adv_BT, mask_BT, batch.correct_B, batch.group_ids_B, delta=cfg.delta, mode=cfg.mode)
    metrics = {(f"balance/{k}" if k.startswith(("pass_rate_hist", "share_all")) else f"calib/{k}"): float(v)
               for k, v in stats.items()}
    keep_B = torch.ones(batch.size, dtype=torch.bool)
    if not cfg.enabled:
        return adv_BT, keep_B, metrics
    if cfg.method == "shift":
        shifted = C.margin_shift(adv_BT, mask_BT, batch.correct_B, batch.group_ids_B, delta=cfg.delta,
                                 mode=cfg.mode, direction=cfg.direction, scope=cfg.scope)
        delta_B = (C.sequence_returns(shifted, mask_BT) - C.sequence_returns(adv_BT, mask_BT)).abs()
        moved_B = delta_B > 1e-7
        groups = batch.group_ids_B.unique()
        moved_groups = batch.group_ids_B[moved_B].unique()
        metrics["calib/shifted_group_frac"] = len(moved_groups) / max(len(groups), 1)
        metrics["calib/mean_shift"] = float(delta_B[moved_B].mean()) if moved_B.any() else 0.0
        return shifted, keep_B, metrics
    keep_B = C.margin_mask(adv_BT, mask_BT, batch.correct_B, batch.group_ids_B, delta=cfg.delta, mode=cfg.mode,
                           strategy=cfg.mask_strategy, min_retain_ratio=cfg.min_retain_ratio)
    dropped_groups = batch.group_ids_B[~keep_B].unique()
    metrics["calib/masked_group_frac"] = len(dropped_groups) / max(len(batch.group_ids_B.unique()), 1)
    metrics["calib/masked_rollout_frac"] = float((~keep_B).float().mean())
    return adv_BT, keep_B, metrics
