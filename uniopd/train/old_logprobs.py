"""Old log-probs for rollouts an engine drew with its own kernels (vLLM): recomputed by the trainer.

An inference engine's log-probs of the sampled tokens differ from the trainer's forward by
kernel and precision differences (|Δ log p| ~ 1e-6 in fp32, ~1e-2 in bf16). Used as PPO's
"old" log-probs they would make the ratio π_θ / π_old start away from 1 and clip tokens
before any update. So, for an engine whose `EngineSupport.trainer_logprobs` is False, the
trainer recomputes them with the student, in one no-grad pass before the token advantages
(the student side of log πT − log πS is then the trainer's too), as verl does:

    rollout.old_logprobs=trainer   old = log π_trainer(y_t)                       (ratio starts at 1)
    rollout.old_logprobs=engine    old = log π_trainer(y_t), and each token's loss is weighted by
                                   w_t = min(exp(log π_trainer(y_t) − log π_engine(y_t)), tis_cap)

`engine` is truncated importance sampling (Yao et al. 2025, verl's `tis_imp_ratio_cap`): the
tokens were drawn from the engine's π, the loss is an expectation under the trainer's. The
weight applies to the sampled-token (PPO) loss only; dense losses are left unweighted. The
mismatch is logged each step as `rollout/logprob_diff_mean` and `rollout/logprob_diff_max`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from uniopd.batch import StepBatch
from uniopd.config import RolloutConfig
from uniopd.models.forward import response_logprobs
from uniopd.models.loading import LoadedModel
from uniopd.train.micro import micro_inputs

if TYPE_CHECKING:
    from uniopd.train.strategy import TrainingStrategy


@torch.no_grad()
def trainer_logprobs(student: LoadedModel, batch: StepBatch, prompt_ids: list[list[int]], *, temperature: float,
                     micro_batch_size: int, chunk_size: int, share_prefix: bool = True,
                     multimodal: list | None = None, suppress_ids: list[int] | None = None) -> torch.Tensor:
    """log π_student(y_t | x, y<t) at `temperature` for every response token, as [B, T] (0 past each end)."""
    model = student.model
    device = next(model.parameters()).device
    out_BT = torch.zeros_like(batch.old_logp_BT)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, batch.size, micro_batch_size):
            micro = list(range(start, min(start + micro_batch_size, batch.size)))
            micro = [r for r in micro if batch.samples[r].response_ids]
            if not micro:
                continue
            layout, extra = micro_inputs(student, model, batch, prompt_ids, micro, multimodal, device,
                                         share_prefix=share_prefix)
            logp_N, _ = response_logprobs(model, layout, chunk_size=chunk_size, temperature=temperature,
                                          extra_inputs=extra, suppress_ids=suppress_ids)
            rows_N = torch.tensor(micro)[layout.row_N.cpu()]
            out_BT[rows_N, layout.col_N.cpu()] = logp_N.float().cpu()
    finally:
        model.train(was_training)
    return out_BT


def replace_engine_logprobs(batch: StepBatch, trainer_logp_BT: torch.Tensor, cfg: RolloutConfig,
                            strategy: TrainingStrategy | None = None) -> dict[str, float]:
    """Swap the engine's old log-probs for the trainer's (and set the TIS weights); the mismatch
    metrics, over every process's rows when `strategy` spans several (each has its own engine)."""
    engine_logp_BT = batch.old_logp_BT
    mask_BT = batch.mask_BT
    diff_BT = (trainer_logp_BT - engine_logp_BT).abs() * mask_BT
    sums = {"n": float(mask_BT.sum()), "diff": float(diff_BT.sum())}
    diff_max = float(diff_BT.max()) if sums["n"] else 0.0
    if cfg.old_logprobs == "engine":
        weight_BT = torch.exp((trainer_logp_BT - engine_logp_BT).clamp(max=20.0)).clamp(max=cfg.tis_cap)
        batch.is_weight_BT = weight_BT * mask_BT
        sums["tis"] = float(batch.is_weight_BT.sum())
        sums["capped"] = float(((weight_BT >= cfg.tis_cap) & mask_BT).sum())
    if strategy is not None:
        sums, diff_max = strategy.reduce_sums(sums), strategy.reduce_max(diff_max)
    n = max(sums["n"], 1.0)
    metrics = {"rollout/logprob_diff_mean": sums["diff"] / n, "rollout/logprob_diff_max": diff_max}
    if "tis" in sums:
        metrics["rollout/tis_weight_mean"] = sums["tis"] / n
        metrics["rollout/tis_capped_frac"] = sums["capped"] / n
    batch.old_logp_BT = trainer_logp_BT
    return metrics
