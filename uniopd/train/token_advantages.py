"""The teacher signal of a step as token advantages: reverse KL, margin calibration, outcome.

    A_t = kl_coef · (log πT(y_t) − log πS(y_t))          (`uniopd.algo.advantages`)
    then margin shift / mask on returns over all response tokens, then the log-ratio clip
    (`calibration.*`, `uniopd.algo.teacher_side`: the release's order)
    then + outcome_weight · (verifier reward − group baseline) on every kept token
    rows whose teacher gave no signal (`batch.teacher_ok_B` False) get advantage 0, leave the
    loss, and are in neither side of any margin

Metrics describe the advantages before calibration (order consistency), and the release's
`advantages/correct|incorrect` after it.
"""

from __future__ import annotations

from uniopd.algo.advantages import outcome_advantages, reverse_kl_advantages
from uniopd.algo.teacher_side import calibrate_advantages
from uniopd.batch import StepBatch
from uniopd.config import CalibrationConfig, LossConfig


def token_advantages(batch: StepBatch, loss_cfg: LossConfig, calib_cfg: CalibrationConfig) -> dict[str, float]:
    """Fill batch.adv_BT and batch.keep_B from the scored batch; returns the calibration metrics."""
    adv_BT = reverse_kl_advantages(batch.old_logp_BT, batch.teacher_logp_BT, batch.mask_BT, kl_coef=loss_cfg.kl_coef)
    c = calib_cfg
    result = calibrate_advantages(adv_BT, batch.old_logp_BT, batch.teacher_logp_BT, batch.mask_BT, batch.correct_B,
                                  batch.group_ids_B, enabled=c.enabled, method=c.method, delta=c.delta, mode=c.mode,
                                  direction=c.direction, scope=c.scope, mask_strategy=c.mask_strategy,
                                  min_retain_ratio=c.min_retain_ratio, logratio_clip=c.logratio_clip,
                                  # A failed teacher call is no judgement of the rollout: its row is left
                                  # out of the margins and order-consistency statistics too, not G = 0.
                                  known_B=batch.teacher_ok_B, teacher_ok_B=batch.teacher_ok_B)
    batch.adv_BT, batch.mask_BT, batch.keep_B, metrics = result
    if batch.balance_keep_B is not None:
        batch.keep_B = batch.keep_B & batch.balance_keep_B
    if loss_cfg.outcome_weight:
        out_B = outcome_advantages(batch.score_B, batch.group_ids_B, baseline=loss_cfg.outcome_baseline)
        batch.adv_BT = batch.adv_BT + loss_cfg.outcome_weight * out_B[:, None] * batch.mask_BT
    return metrics
