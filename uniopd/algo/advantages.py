"""Token advantages for on-policy distillation.

Sampled-token reverse KL (the OPD signal): for a response token y_t sampled by the student,

    r_t = kl_coef * (log πT(y_t | x, y<t) − log πS_old(y_t | x, y<t))

with no discount and no bootstrapping: each token is credited only with its own
log-ratio, as in tinker-cookbook and the Uni-OPD paper (the per-token reverse-KL
estimate). Minimising E[−r_t · ratio_t] follows the gradient of −KL(πS‖πT).

The optional outcome term adds w · (R − baseline) to every token of a response, where R is
the verifier's score and the baseline is the mean score of the prompt's group ("group") or
zero ("none").
"""

from __future__ import annotations

import torch


def reverse_kl_advantages(student_logp_BT: torch.Tensor, teacher_logp_BT: torch.Tensor, mask_BT: torch.Tensor,
                          *, kl_coef: float = 1.0) -> torch.Tensor:
    """[B, T] token advantages kl_coef·(log πT − log πS); 0 where mask_BT is False."""
    adv_BT = kl_coef * (teacher_logp_BT - student_logp_BT)
    return torch.where(mask_BT, adv_BT, torch.zeros_like(adv_BT)).detach()


def group_mean(values_B: torch.Tensor, group_ids_B: torch.Tensor) -> torch.Tensor:
    """Each element replaced by the mean of its group, [B]."""
    _, inverse = torch.unique(group_ids_B, return_inverse=True)
    sums = torch.zeros(int(inverse.max()) + 1 if len(inverse) else 0, dtype=values_B.dtype,
                       device=values_B.device).index_add_(0, inverse, values_B)
    counts = torch.bincount(inverse, minlength=len(sums)).to(values_B.dtype)
    return (sums / counts.clamp(min=1))[inverse]


def outcome_advantages(rewards_B: torch.Tensor, group_ids_B: torch.Tensor, *, baseline: str = "group") -> torch.Tensor:
    """[B] outcome advantage R − baseline, constant over each response's tokens."""
    rewards_B = rewards_B.float()
    if baseline == "none":
        return rewards_B
    if baseline == "group":
        return rewards_B - group_mean(rewards_B, group_ids_B)
    raise ValueError(f"loss.outcome_baseline: unknown baseline {baseline!r}")
