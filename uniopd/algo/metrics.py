"""Token-level diagnostics of how the student's and the teacher's distributions relate.

All are means over valid tokens of per-token quantities, with S, T the full-vocabulary
softmax of the raw logits (no temperature), A_S = top-k(S), A_T = top-k(T) and the shared
set A = A_S & A_T:

    topk_overlap              |A| / k                                       (in [0, 1])
    shared_mass_student       sum_{i in A} S_i
    shared_mass_teacher       sum_{i in A} T_i
    overlap_token_advantage   sum_{i in A} S_i (log T_i - log S_i)
    entropy_student           H(S) = -sum_v S_v log S_v;  entropy_teacher likewise
    entropy_gap               H(S) - H(T)
    reverse_kl                KL(S || T) over the full vocabulary

The overlap-token advantage follows "Rethinking OPD" in spirit: the OPD token advantage
log T - log S, taken in expectation under the student but only over the tokens both models
rank in their top-k. It is minus the (unnormalised) top-k reverse-KL restricted to A:
positive when the teacher puts more mass than the student on the shared tokens (the student
is under-confident where they agree), negative when the student over-commits. It is 0 when
A is empty.

Chunking: every function here is a no-grad token-mean. For a 150k vocabulary, call
`token_diagnostic_sums` per chunk of logits (for instance over
`uniopd.algo.losses.chunked.iter_logit_chunks`) and `reduce_diagnostic_sums` on the list:
sums and counts add across chunks, means do not. `logratio_histogram` returns counts,
which also add.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_LOGRATIO_EDGES",
    "DIAGNOSTIC_KEYS",
    "entropy",
    "entropy_gap",
    "logratio_histogram",
    "overlap_token_advantage",
    "reduce_diagnostic_sums",
    "reverse_kl_mean",
    "shared_mass",
    "token_diagnostic_sums",
    "token_diagnostics",
    "topk_overlap",
]

DIAGNOSTIC_KEYS = (
    "diag/topk_overlap",
    "diag/shared_mass_student",
    "diag/shared_mass_teacher",
    "diag/overlap_token_advantage",
    "diag/entropy_student",
    "diag/entropy_teacher",
    "diag/entropy_gap",
    "diag/reverse_kl",
)
_COUNT_KEY = "diag/num_tokens"

# Bins of log piS - log piT; Uni-OPD's released code masks tokens with |ratio| >= 10.
DEFAULT_LOGRATIO_EDGES = (-10.0, -5.0, -2.0, -1.0, -0.5, -0.1, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0)


def _log_softmax(logits_BTV: Tensor) -> Tensor:
    # float32 at least: entropies of a 150k-way bf16 softmax are visibly off.
    if logits_BTV.dtype in (torch.float16, torch.bfloat16):
        logits_BTV = logits_BTV.float()
    return torch.log_softmax(logits_BTV, dim=-1)


def _masked_mean(per_token_BT: Tensor, mask_BT: Tensor) -> float:
    mask_BT = mask_BT.to(device=per_token_BT.device, dtype=torch.bool)
    total = torch.where(mask_BT, per_token_BT, 0.0).sum()
    return (total / mask_BT.sum().clamp(min=1)).item()


def _shared_BTK(
    student_logits_BTV: Tensor, teacher_logits_BTV: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Student's top-k ids [B, T, k] and whether each is also in the teacher's top-k."""
    vocab_size = student_logits_BTV.shape[-1]
    if not 1 <= k <= vocab_size:
        raise ValueError(f"k must be in [1, V={vocab_size}], got {k}")
    s_ids_BTK = student_logits_BTV.topk(k, dim=-1).indices
    t_ids_BTK = teacher_logits_BTV.topk(k, dim=-1).indices
    shared_BTK = (s_ids_BTK.unsqueeze(-1) == t_ids_BTK.unsqueeze(-2)).any(dim=-1)
    return s_ids_BTK, shared_BTK


@torch.no_grad()
def topk_overlap(
    student_logits_BTV: Tensor, teacher_logits_BTV: Tensor, mask_BT: Tensor, *, k: int
) -> float:
    """Mean over valid positions of |top-k(S) & top-k(T)| / k.

    Args:
        student_logits_BTV, teacher_logits_BTV: [B, T, V] logits.
        mask_BT: [B, T] bool.
        k: top-k size.
    """
    _, shared_BTK = _shared_BTK(student_logits_BTV, teacher_logits_BTV, k)
    return _masked_mean(shared_BTK.sum(dim=-1).to(torch.float32) / k, mask_BT)


@torch.no_grad()
def shared_mass(
    student_logits_BTV: Tensor, teacher_logits_BTV: Tensor, mask_BT: Tensor, *, k: int
) -> tuple[float, float]:
    """(student, teacher) mean probability mass on the shared top-k tokens.

    Args:
        student_logits_BTV, teacher_logits_BTV: [B, T, V] logits.
        mask_BT: [B, T] bool.
        k: top-k size.
    """
    sums = token_diagnostic_sums(student_logits_BTV, teacher_logits_BTV, mask_BT, k=k)
    means = reduce_diagnostic_sums([sums])
    return means["diag/shared_mass_student"], means["diag/shared_mass_teacher"]


@torch.no_grad()
def overlap_token_advantage(
    student_logits_BTV: Tensor, teacher_logits_BTV: Tensor, mask_BT: Tensor, *, k: int
) -> float:
    """Mean over valid positions of sum_{shared top-k i} S_i (log T_i - log S_i).

    Args:
        student_logits_BTV, teacher_logits_BTV: [B, T, V] logits.
        mask_BT: [B, T] bool.
        k: top-k size.
    """
    s_logp_BTV = _log_softmax(student_logits_BTV)
    t_logp_BTV = _log_softmax(teacher_logits_BTV)
    s_ids_BTK, shared_BTK = _shared_BTK(student_logits_BTV, teacher_logits_BTV, k)
    s_at_BTK = s_logp_BTV.gather(-1, s_ids_BTK)
    t_at_BTK = t_logp_BTV.gather(-1, s_ids_BTK)
    adv_BT = torch.where(shared_BTK, s_at_BTK.exp() * (t_at_BTK - s_at_BTK), 0.0).sum(dim=-1)
    return _masked_mean(adv_BT, mask_BT)


@torch.no_grad()
def entropy(logits_BTV: Tensor, mask_BT: Tensor) -> float:
    """Mean over valid positions of H = -sum_v p_v log p_v (nats).

    Args:
        logits_BTV: [B, T, V] logits.
        mask_BT: [B, T] bool.
    """
    logp_BTV = _log_softmax(logits_BTV)
    return _masked_mean(-(logp_BTV.exp() * logp_BTV).sum(dim=-1), mask_BT)


@torch.no_grad()
def entropy_gap(student_logits_BTV: Tensor, teacher_logits_BTV: Tensor, mask_BT: Tensor) -> float:
    """Mean over valid positions of H(S) - H(T) (positive: the student is less certain)."""
    return entropy(student_logits_BTV, mask_BT) - entropy(teacher_logits_BTV, mask_BT)


@torch.no_grad()
def reverse_kl_mean(
    student_logits_BTV: Tensor, teacher_logits_BTV: Tensor, mask_BT: Tensor
) -> float:
    """Mean over valid positions of the full-vocabulary KL(S || T) (the OPD objective)."""
    s_logp_BTV = _log_softmax(student_logits_BTV)
    t_logp_BTV = _log_softmax(teacher_logits_BTV)
    return _masked_mean((s_logp_BTV.exp() * (s_logp_BTV - t_logp_BTV)).sum(dim=-1), mask_BT)


@torch.no_grad()
def logratio_histogram(
    student_logp_BT: Tensor,
    teacher_logp_BT: Tensor,
    mask_BT: Tensor,
    *,
    edges: Sequence[float] = DEFAULT_LOGRATIO_EDGES,
) -> Tensor:
    """Counts of the sampled-token log-ratio log piS - log piT per bin.

    Bin 0 is (-inf, edges[0]), bin i is [edges[i-1], edges[i]), the last bin is
    [edges[-1], inf): len(edges) + 1 bins, so nothing valid is dropped and counts from chunks
    or steps add up.

    Args:
        student_logp_BT: [B, T] student log-prob of each sampled token.
        teacher_logp_BT: [B, T] teacher log-prob of the same tokens.
        mask_BT: [B, T] bool.
        edges: increasing bin edges.

    Returns:
        [len(edges) + 1] int64 counts (on the input's device).
    """
    edges_E = torch.as_tensor(list(edges), dtype=torch.float64, device=student_logp_BT.device)
    if edges_E.numel() == 0 or not bool((edges_E[1:] > edges_E[:-1]).all()):
        raise ValueError(f"edges must be non-empty and strictly increasing, got {list(edges)}")
    mask_BT = mask_BT.to(device=student_logp_BT.device, dtype=torch.bool)
    ratio_M = (student_logp_BT.double() - teacher_logp_BT.double())[mask_BT]
    bins_M = torch.bucketize(ratio_M, edges_E, right=True)
    return torch.bincount(bins_M, minlength=edges_E.numel() + 1)


@torch.no_grad()
def token_diagnostic_sums(
    student_logits_BTV: Tensor, teacher_logits_BTV: Tensor, mask_BT: Tensor, *, k: int
) -> dict[str, float]:
    """Sums over valid tokens of every per-token diagnostic, plus the token count.

    Combine chunks with `reduce_diagnostic_sums`. One host sync for all of them.

    Args:
        student_logits_BTV, teacher_logits_BTV: [B, T, V] logits.
        mask_BT: [B, T] bool.
        k: top-k size for the overlap metrics.

    Returns:
        {key: sum} for DIAGNOSTIC_KEYS except the entropy gap (derived from the means), and
        "diag/num_tokens".
    """
    if student_logits_BTV.shape != teacher_logits_BTV.shape:
        raise ValueError("student and teacher logits must have the same shape")
    s_logp_BTV = _log_softmax(student_logits_BTV)
    t_logp_BTV = _log_softmax(teacher_logits_BTV)
    s_ids_BTK, shared_BTK = _shared_BTK(student_logits_BTV, teacher_logits_BTV, k)
    s_at_BTK = s_logp_BTV.gather(-1, s_ids_BTK)
    t_at_BTK = t_logp_BTV.gather(-1, s_ids_BTK)
    s_p_BTV = s_logp_BTV.exp()
    per_token = {
        "diag/topk_overlap": shared_BTK.sum(dim=-1).to(s_at_BTK.dtype) / k,
        "diag/shared_mass_student": torch.where(shared_BTK, s_at_BTK.exp(), 0.0).sum(dim=-1),
        "diag/shared_mass_teacher": torch.where(shared_BTK, t_at_BTK.exp(), 0.0).sum(dim=-1),
        "diag/overlap_token_advantage": torch.where(
            shared_BTK, s_at_BTK.exp() * (t_at_BTK - s_at_BTK), 0.0
        ).sum(dim=-1),
        "diag/entropy_student": -(s_p_BTV * s_logp_BTV).sum(dim=-1),
        "diag/entropy_teacher": -(t_logp_BTV.exp() * t_logp_BTV).sum(dim=-1),
        "diag/reverse_kl": (s_p_BTV * (s_logp_BTV - t_logp_BTV)).sum(dim=-1),
    }
    mask_BT = mask_BT.to(device=s_logp_BTV.device, dtype=torch.bool)
    sums_S = torch.stack(
        [torch.where(mask_BT, v_BT, 0.0).sum() for v_BT in per_token.values()]
        + [mask_BT.sum().to(s_logp_BTV.dtype)]
    )
    return dict(zip([*per_token, _COUNT_KEY], sums_S.tolist()))


def reduce_diagnostic_sums(sums: Iterable[dict[str, float]]) -> dict[str, float]:
    """Add `token_diagnostic_sums` outputs and turn them into token-means.

    Returns:
        {key: mean} for every key of DIAGNOSTIC_KEYS (0.0 when there was no valid token),
        plus "diag/num_tokens".
    """
    totals: dict[str, float] = {}
    for part in sums:
        for key, value in part.items():
            totals[key] = totals.get(key, 0.0) + value
    count = totals.pop(_COUNT_KEY, 0.0)
    means = {key: (value / count if count > 0 else 0.0) for key, value in totals.items()}
    for key in DIAGNOSTIC_KEYS:
        means.setdefault(key, 0.0)
    means["diag/entropy_gap"] = means["diag/entropy_student"] - means["diag/entropy_teacher"]
    means[_COUNT_KEY] = count
    return {key: means[key] for key in (*DIAGNOSTIC_KEYS, _COUNT_KEY)}


def token_diagnostics(
    student_logits_BTV: Tensor, teacher_logits_BTV: Tensor, mask_BT: Tensor, *, k: int
) -> dict[str, float]:
    """Every diagnostic of this module in one pass, keyed for logging ("diag/...").

    Args:
        student_logits_BTV, teacher_logits_BTV: [B, T, V] logits.
        mask_BT: [B, T] bool.
        k: top-k size for the overlap metrics.

    Returns:
        {"diag/topk_overlap", "diag/shared_mass_student", "diag/shared_mass_teacher",
         "diag/overlap_token_advantage", "diag/entropy_student", "diag/entropy_teacher",
         "diag/entropy_gap", "diag/reverse_kl", "diag/num_tokens"} -> float.
    """
    return reduce_diagnostic_sums(
        [token_diagnostic_sums(student_logits_BTV, teacher_logits_BTV, mask_BT, k=k)]
    )
