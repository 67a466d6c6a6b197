"""The teacher signal of a step as token advantages: reverse KL, margin calibration, outcome.

    A_t = kl_coef · (log πT(y_t) − log πS(y_t))          (`uniopd.algo.advantages`)
    then margin shift / mask (`calibration.*`, `uniopd.algo.calibration`)
    then + outcome_weight · (verifier reward − group baseline) on every token

Calibration order: (1) optional log-ratio clip mask (|log πS − log πT| ≥ clip drops the
token); (2) metrics on the raw advantages (order consistency before calibration); (3) margin
shift or margin mask.
"""

from __future__ import annotations

import torch

from uniopd.algo import calibration as C
from uniopd.algo.advantages import outcome_advantages, reverse_kl_advantages
from uniopd.batch import StepBatch
from uniopd.config import CalibrationConfig, LossConfig


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


def token_advantages(batch: StepBatch, loss_cfg: LossConfig, calib_cfg: CalibrationConfig) -> dict[str, float]:
    """Fill batch.adv_BT and batch.keep_B from the scored batch; returns the calibration metrics."""
    adv_BT = reverse_kl_advantages(batch.old_logp_BT, batch.teacher_logp_BT, batch.mask_BT, kl_coef=loss_cfg.kl_coef)
    batch.adv_BT, batch.keep_B, metrics = calibrate(adv_BT, batch, calib_cfg)
    if loss_cfg.outcome_weight:
        out_B = outcome_advantages(batch.score_B, batch.group_ids_B, baseline=loss_cfg.outcome_baseline)
        batch.adv_BT = batch.adv_BT + loss_cfg.outcome_weight * out_B[:, None] * batch.mask_BT
    return metrics
