"""PPO-clipped policy-gradient loss on sampled tokens (the engine's default OPD loss).

    ratio_t = exp(log πθ(y_t) − log πold(y_t))
    L = Σ_t mask_t · max(−A_t·ratio_t, −A_t·clip(ratio_t, 1−ε_low, 1+ε_high)) / Σ_t mask_t

Token-mean aggregation over every valid token of the mini-batch ("token-mean" in verl);
ε_low/ε_high are asymmetric as in DAPO (the released Uni-OPD scripts use 0.2/0.28).
`normalizer` lets a micro-batch divide by the token count of the whole mini-batch, so
accumulated gradients equal those of one big batch. `token_weight` gives other
aggregations: 1/|τ| per token with normalizer = the number of responses is verl's
"seq-mean-token-mean" (each response's mean, then the mean over responses; the release's).
"""

from __future__ import annotations

import torch


def ppo_clip_loss(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, adv_BT: torch.Tensor, mask_BT: torch.Tensor,
                  *, clip_low: float = 0.2, clip_high: float = 0.28,
                  normalizer: float | None = None,
                  token_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scalar PPO loss and detached stats (clip fraction, approx KL old→new, mean ratio).

    Shapes: any matching shape (written [B, T]); mask_BT bool; token_weight (optional) a
    per-token weight of the same shape. normalizer defaults to the number of valid tokens;
    with no valid token the loss is 0 (still part of the graph).
    """
    mask = mask_BT.to(logp_BT.dtype)
    n = mask.sum() if normalizer is None else torch.as_tensor(normalizer, dtype=logp_BT.dtype)
    n = n.clamp(min=1.0)
    log_ratio = (logp_BT - old_logp_BT).clamp(-20.0, 20.0)  # exp overflow guard, far outside clip range
    ratio = torch.exp(log_ratio)
    unclipped = -adv_BT * ratio
    clipped = -adv_BT * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    weighted = mask if token_weight is None else mask * token_weight.to(mask.dtype)
    loss = (per_token * weighted).sum() / n
    with torch.no_grad():
        valid = mask.sum().clamp(min=1.0)
        stats = {
            "clip_frac": ((clipped > unclipped).to(mask.dtype) * mask).sum() / valid,
            "approx_kl": (((ratio - 1) - log_ratio) * mask).sum() / valid,  # k3 estimator
            "ratio_mean": (ratio * mask).sum() / valid,
        }
    return loss, stats
