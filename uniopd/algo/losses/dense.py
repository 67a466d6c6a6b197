"""Full-vocabulary distillation losses: forward KL, reverse KL, generalized JSD, mixed KL.

Per valid token t, with S = softmax(z_S / tau) and T = softmax(z_T / tau) the student's
and the teacher's next-token distributions over the whole vocabulary:

    reverse_kl      KL(S || T) = sum_v S_v (log S_v - log T_v)         (mode seeking; OPD default)
    forward_kl      KL(T || S) = sum_v T_v (log T_v - log S_v)         (mass covering; classic KD)
    generalized_jsd beta = 0: KL(T || S);  beta = 1: KL(S || T);  otherwise
                    beta * KL(T || M) + (1 - beta) * KL(S || M),   M = beta * T + (1 - beta) * S
    mixed_kl        w * KL(T || S) + (1 - w) * KL(S || T)

and the loss is the token-mean over every valid token of the batch:

    L = sum_{b,t} mask[b,t] * l[b,t] / max(1, sum_{b,t} mask[b,t])

Uni-OPD itself trains on the sampled-token estimator (advantage log T(y) - log S(y) of the
token the student sampled, `uniopd.algo.losses.sampled`); these dense losses are the
alternatives of GKD, verl and "Rethinking OPD", selected with `loss.kind`.

The generalized JSD follows GKD (Agarwal et al., 2024) exactly as TRL's
`GKDTrainer.generalized_jsd_loss` does (same beta convention, log M computed with a
log-sum-exp of the weighted log-probs), with two departures: the mean is over valid tokens
rather than TRL's "batchmean" (sum / number of sequences), and logits are divided by the
temperature with no tau**2 factor (Hinton et al. scale by tau**2 to keep gradient magnitudes
comparable across temperatures; OPD runs at tau = 1 where both agree).
Like TRL's, this convention is discontinuous at the endpoints: as beta -> 0 the mixture form
tends to 0 (M -> S), while beta = 0 is defined as KL(T || S) (and symmetrically at beta = 1).

Conventions shared by every dense loss (here and in `topk.py`):
- signature `fn(student_logits_BTV, teacher_logits_BTV, mask_BT, *, ..., reduction="mean")`;
  `reduction` is "mean" (token-mean above), "sum" (numerator only, so a chunked driver can
  add chunks and divide once) or "none" (per-token [B, T], zero at masked positions).
- no valid token gives 0.0 attached to the graph (never NaN), so a step on an empty batch
  is a no-op rather than a crash.
- nothing detaches the teacher: callers compute teacher logits under `torch.no_grad()`.
  Gradients into the teacher are only there if the caller asks for them.
- half-precision logits are upcast to float32 before the softmax; float64 stays float64
  (gradcheck).
- logits must be finite at masked positions too (they are zeroed with `torch.where`, whose
  backward would turn a NaN produced there into NaN gradients).

The registry that picks one of these by name (`loss.kind`) lives in
`uniopd.algo.losses.chunked`, next to the chunked driver that runs them at full vocabulary
size: these functions materialise [B, T, V] tensors and are meant to be called per chunk.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "REDUCTIONS",
    "check_logits_pair",
    "forward_kl",
    "generalized_jsd",
    "kl_from_logp",
    "mixed_kl",
    "reduce_tokens",
    "reverse_kl",
    "tempered_log_softmax",
    "upcast",
]

REDUCTIONS = ("mean", "sum", "none")


def reduce_tokens(per_token_BT: Tensor, mask_BT: Tensor, reduction: str = "mean") -> Tensor:
    """Reduce per-token losses over the valid tokens of a batch.

    Args:
        per_token_BT: [B, T] per-token loss (any shape works; mask must match it).
        mask_BT: [B, T] bool, True where the token counts.
        reduction: "mean" (sum / max(1, count)), "sum", or "none" ([B, T], 0 where masked).

    Returns:
        Scalar (or [B, T] for "none"); 0.0 with a grad-carrying graph when nothing is valid.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    mask_BT = mask_BT.to(device=per_token_BT.device, dtype=torch.bool)
    # where, not multiply: 0 * inf from a garbage padded position would be NaN.
    masked_BT = torch.where(mask_BT, per_token_BT, per_token_BT.new_zeros(()))
    if reduction == "none":
        return masked_BT
    total = masked_BT.sum()
    if reduction == "sum":
        return total
    return total / mask_BT.sum().clamp(min=1).to(total.dtype)


def tempered_log_softmax(logits_BTV: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature) over the last dim, in float32 at least.

    Args:
        logits_BTV: [..., V] logits.
        temperature: > 0; logits are divided by it (no tau**2 rescaling of the loss).

    Returns:
        [..., V] log-probabilities (float32, or float64 if the input is float64).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits_BTV = upcast(logits_BTV)
    if temperature != 1.0:
        logits_BTV = logits_BTV / temperature
    return torch.log_softmax(logits_BTV, dim=-1)


def upcast(x: Tensor) -> Tensor:
    """float16/bfloat16 -> float32 (softmax over 150k entries needs the mantissa)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def kl_from_logp(logp_BTV: Tensor, logq_BTV: Tensor) -> Tensor:
    """Per-position KL(p || q) = sum_v p_v (log p_v - log q_v) from log-probs.

    Args:
        logp_BTV, logq_BTV: [..., V] log-probabilities, finite.

    Returns:
        [...] KL, summed over the last dim.
    """
    return (logp_BTV.exp() * (logp_BTV - logq_BTV)).sum(dim=-1)


def check_logits_pair(
    student_logits_BTV: Tensor, teacher_logits_BTV: Tensor, mask_BT: Tensor
) -> None:
    """Raise ValueError unless logits are [..., V] alike and the mask is their [...] part."""
    if student_logits_BTV.shape != teacher_logits_BTV.shape:
        raise ValueError(
            "student and teacher logits must have the same shape (same vocabulary), got "
            f"{tuple(student_logits_BTV.shape)} and {tuple(teacher_logits_BTV.shape)}"
        )
    if tuple(mask_BT.shape) != tuple(student_logits_BTV.shape[:-1]):
        raise ValueError(
            f"mask shape {tuple(mask_BT.shape)} does not match logits "
            f"{tuple(student_logits_BTV.shape)} without the vocabulary dim"
        )


def forward_kl(
    student_logits_BTV: Tensor,
    teacher_logits_BTV: Tensor,
    mask_BT: Tensor,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """Token-mean of KL(T || S) over the full vocabulary (mass covering, classic KD).

    Args:
        student_logits_BTV: [B, T, V] student logits.
        teacher_logits_BTV: [B, T, V] teacher logits.
        mask_BT: [B, T] bool, valid tokens.
        temperature: both models' logits are divided by it before the softmax.
        reduction: "mean" | "sum" | "none", see `reduce_tokens`.

    Returns:
        Scalar ([B, T] for reduction="none").
    """
    check_logits_pair(student_logits_BTV, teacher_logits_BTV, mask_BT)
    s_logp_BTV = tempered_log_softmax(student_logits_BTV, temperature)
    t_logp_BTV = tempered_log_softmax(teacher_logits_BTV, temperature)
    return reduce_tokens(kl_from_logp(t_logp_BTV, s_logp_BTV), mask_BT, reduction)


def reverse_kl(
    student_logits_BTV: Tensor,
    teacher_logits_BTV: Tensor,
    mask_BT: Tensor,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """Token-mean of KL(S || T) over the full vocabulary (mode seeking, the OPD objective).

    Args:
        student_logits_BTV: [B, T, V] student logits.
        teacher_logits_BTV: [B, T, V] teacher logits.
        mask_BT: [B, T] bool, valid tokens.
        temperature: both models' logits are divided by it before the softmax.
        reduction: "mean" | "sum" | "none", see `reduce_tokens`.

    Returns:
        Scalar ([B, T] for reduction="none").
    """
    check_logits_pair(student_logits_BTV, teacher_logits_BTV, mask_BT)
    s_logp_BTV = tempered_log_softmax(student_logits_BTV, temperature)
    t_logp_BTV = tempered_log_softmax(teacher_logits_BTV, temperature)
    return reduce_tokens(kl_from_logp(s_logp_BTV, t_logp_BTV), mask_BT, reduction)


def generalized_jsd(
    student_logits_BTV: Tensor,
    teacher_logits_BTV: Tensor,
    mask_BT: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """Generalized Jensen-Shannon divergence of GKD, TRL's beta convention.

    beta = 0 is KL(T || S), beta = 1 is KL(S || T); otherwise
    beta * KL(T || M) + (1 - beta) * KL(S || M) with M = beta * T + (1 - beta) * S.
    beta = 0.5 is the symmetric JSD.

    Args:
        student_logits_BTV: [B, T, V] student logits.
        teacher_logits_BTV: [B, T, V] teacher logits.
        mask_BT: [B, T] bool, valid tokens.
        beta: in [0, 1].
        temperature: both models' logits are divided by it before the softmax.
        reduction: "mean" | "sum" | "none", see `reduce_tokens`.

    Returns:
        Scalar ([B, T] for reduction="none").
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    check_logits_pair(student_logits_BTV, teacher_logits_BTV, mask_BT)
    s_logp_BTV = tempered_log_softmax(student_logits_BTV, temperature)
    t_logp_BTV = tempered_log_softmax(teacher_logits_BTV, temperature)
    # The endpoints are special-cased (as in TRL) because log(0) weights would give
    # -inf + finite in the mixture and 0 * inf terms in the weighted sum.
    if beta == 0.0:
        per_token_BT = kl_from_logp(t_logp_BTV, s_logp_BTV)
    elif beta == 1.0:
        per_token_BT = kl_from_logp(s_logp_BTV, t_logp_BTV)
    else:
        # logaddexp is the two-term logsumexp without stacking a third [B, T, V] copy.
        m_logp_BTV = torch.logaddexp(s_logp_BTV + math.log(1.0 - beta), t_logp_BTV + math.log(beta))
        per_token_BT = beta * kl_from_logp(t_logp_BTV, m_logp_BTV) + (1.0 - beta) * kl_from_logp(
            s_logp_BTV, m_logp_BTV
        )
    return reduce_tokens(per_token_BT, mask_BT, reduction)


def mixed_kl(
    student_logits_BTV: Tensor,
    teacher_logits_BTV: Tensor,
    mask_BT: Tensor,
    *,
    forward_weight: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """forward_weight * KL(T || S) + (1 - forward_weight) * KL(S || T), token-mean.

    Unlike generalized_jsd there is no mixture distribution: this interpolates the two KLs
    themselves (forward_weight = 0 is reverse_kl, 1 is forward_kl).

    Args:
        student_logits_BTV: [B, T, V] student logits.
        teacher_logits_BTV: [B, T, V] teacher logits.
        mask_BT: [B, T] bool, valid tokens.
        forward_weight: in [0, 1], weight of the forward KL(T || S).
        temperature: both models' logits are divided by it before the softmax.
        reduction: "mean" | "sum" | "none", see `reduce_tokens`.

    Returns:
        Scalar ([B, T] for reduction="none").
    """
    if not 0.0 <= forward_weight <= 1.0:
        raise ValueError(f"forward_weight must be in [0, 1], got {forward_weight}")
    check_logits_pair(student_logits_BTV, teacher_logits_BTV, mask_BT)
    s_logp_BTV = tempered_log_softmax(student_logits_BTV, temperature)
    t_logp_BTV = tempered_log_softmax(teacher_logits_BTV, temperature)
    per_token_BT = s_logp_BTV.new_zeros(s_logp_BTV.shape[:-1])
    # Skip a term whose weight is 0: each one is a full [B, T, V] pass.
    if forward_weight > 0.0:
        per_token_BT = per_token_BT + forward_weight * kl_from_logp(t_logp_BTV, s_logp_BTV)
    if forward_weight < 1.0:
        per_token_BT = per_token_BT + (1.0 - forward_weight) * kl_from_logp(s_logp_BTV, t_logp_BTV)
    return reduce_tokens(per_token_BT, mask_BT, reduction)
