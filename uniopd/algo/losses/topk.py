"""Top-k restricted KL: the distillation KL computed on a small token set per position.

Per valid token, pick a set A of token ids (`source`):
    "student"       A = top-k(S)
    "teacher"       A = top-k(T)
    "union"         A = top-k(S) | top-k(T)      (k to 2k ids)
    "intersection"  A = top-k(S) & top-k(T)      (0 to k ids; empty gives 0)
with S, T the full-vocabulary softmax of logits / tau. Over A build, for each model P in {S, T},
a distribution P^A and compute KL over it, reverse KL(S^A || T^A) (the OPD default) or
forward KL(T^A || S^A):

    renormalize=True,  tail=False   P^A_i = P_i / sum_{j in A} P_j                 (a true KL)
    tail=True                       buckets A + {tail}, P^A_i = P_i, P^A_tail = 1 - sum_{j in A} P_j
                                    (already sums to 1, so `renormalize` has no effect; a true
                                    KL, and a lower bound on the full KL by the data-processing
                                    inequality)
    renormalize=False, tail=False   sum_{i in A} S_i (log S_i - log T_i)  with full-vocab log-probs

The last variant is what verl / "Rethinking OPD" call the top-k estimator. It is NOT a KL:
it can be negative (e.g. when the teacher puts more mass than the student on every token of
A). We do not clamp it: a clamp at 0 zeroes the gradient exactly where the student
under-covers the teacher's tokens, and biases the token-mean. Its gradient is still a
descent direction for the full KL restricted to A, which is why it is used.

With k = V every variant equals the full-vocabulary KL.

Departures / choices:
- the tail bucket's mass is computed from the complement (log-sum-exp of the logits outside
  A), not as 1 - sum_A P, which cancels catastrophically when A holds almost all the mass.
  The teacher-top-k-only variant has no complement and must use 1 - sum_A T (floored at the
  smallest normal float when rounding makes the returned mass reach 1).
- the selection of A is not differentiated (top-k is piecewise constant); gradients flow
  through the probabilities of the selected ids (and of the tail).
- tensors over the set carry `_K` even for "union", where the set dim holds 2k slots; slots
  that are duplicates (union) or non-members (intersection) are marked invalid and contribute
  exactly 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from uniopd.algo.losses.dense import check_logits_pair, reduce_tokens, upcast

__all__ = ["TOPK_DIRECTIONS", "TOPK_SOURCES", "topk_kl", "topk_kl_from_teacher_topk"]

TOPK_SOURCES = ("student", "teacher", "union", "intersection")
TOPK_DIRECTIONS = ("reverse", "forward")

# Log-prob standing for "probability 0" in slots that must contribute nothing. Finite, so that
# differences and gradients stay finite (0 * inf would be NaN), and so negative that exp()
# underflows to exactly 0 and that it absorbs any real log-prob added to it in float32/64.
_LOG_ZERO = -1e30


def _validate(direction: str, temperature: float) -> None:
    if direction not in TOPK_DIRECTIONS:
        raise ValueError(f"direction must be one of {TOPK_DIRECTIONS}, got {direction!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _tempered(logits_BTV: Tensor, temperature: float) -> Tensor:
    # No division at temperature 1: at V = 150k each copy is C * 600 kB.
    logits_BTV = upcast(logits_BTV)
    return logits_BTV if temperature == 1.0 else logits_BTV / temperature


def _token_set(
    student_logits_BTV: Tensor, teacher_logits_BTV: Tensor, k: int, source: str
) -> tuple[Tensor, Tensor]:
    """Ids of the token set per position and which slots are real members.

    Returns:
        ids_BTK: [B, T, K] long, K = k (2k for "union").
        valid_BTK: [B, T, K] bool, False for duplicate / non-member slots.
    """
    if source == "student":
        ids_BTK = student_logits_BTV.topk(k, dim=-1).indices
        return ids_BTK, torch.ones_like(ids_BTK, dtype=torch.bool)
    if source == "teacher":
        ids_BTK = teacher_logits_BTV.topk(k, dim=-1).indices
        return ids_BTK, torch.ones_like(ids_BTK, dtype=torch.bool)
    s_ids_BTK = student_logits_BTV.topk(k, dim=-1).indices
    t_ids_BTK = teacher_logits_BTV.topk(k, dim=-1).indices
    # [B, T, k, k] id comparison: k is small (<= a few hundred), V is not.
    t_in_s_BTK = (t_ids_BTK.unsqueeze(-1) == s_ids_BTK.unsqueeze(-2)).any(dim=-1)
    if source == "union":
        ids_BTK = torch.cat([s_ids_BTK, t_ids_BTK], dim=-1)
        valid_BTK = torch.cat([torch.ones_like(t_in_s_BTK), ~t_in_s_BTK], dim=-1)
        return ids_BTK, valid_BTK
    if source == "intersection":
        return t_ids_BTK, t_in_s_BTK
    raise ValueError(f"source must be one of {TOPK_SOURCES}, got {source!r}")


def _membership(ids_BTK: Tensor, valid_BTK: Tensor, vocab_size: int) -> Tensor:
    """[B, T, V] bool, True for the ids of valid slots.

    scatter_add, not scatter: duplicated ids (a union's repeated slot, a padded teacher
    top-k) would make a plain scatter's winner arbitrary.
    """
    # uint8 counts: an id appears at most twice (union), and this is a [B, T, V] tensor.
    counts_BTV = torch.zeros(
        (*ids_BTK.shape[:-1], vocab_size), dtype=torch.uint8, device=ids_BTK.device
    )
    counts_BTV.scatter_add_(-1, ids_BTK, valid_BTK.to(torch.uint8))
    return counts_BTV > 0


def _complement_logp(logits_BTV: Tensor, lse_BT: Tensor, in_set_BTV: Tensor) -> Tensor:
    """[B, T] log of the probability mass outside the set (_LOG_ZERO if the set is everything)."""
    outside_lse_BT = torch.logsumexp(logits_BTV.masked_fill(in_set_BTV, _LOG_ZERO), dim=-1)
    return outside_lse_BT - lse_BT


def _set_kl(
    s_set_logp_BTK: Tensor,
    t_set_logp_BTK: Tensor,
    valid_BTK: Tensor,
    s_tail_logp_BT: Tensor | None,
    t_tail_logp_BT: Tensor | None,
    *,
    renormalize: bool,
    direction: str,
) -> Tensor:
    """Per-token KL over the set (plus tail bucket when tail log-probs are given).

    Args:
        s_set_logp_BTK, t_set_logp_BTK: [B, T, K] full-vocabulary log-probs at the set ids.
        valid_BTK: [B, T, K] bool, real members of the set.
        s_tail_logp_BT, t_tail_logp_BT: [B, T] log tail mass, or None for no tail bucket.

    Returns:
        [B, T] per-token divergence.
    """
    log_zero = s_set_logp_BTK.new_tensor(_LOG_ZERO)
    # Both models get the same log_zero in invalid slots, so p * (log p - log q) = 0 * 0 there.
    s_BTK = torch.where(valid_BTK, s_set_logp_BTK, log_zero)
    t_BTK = torch.where(valid_BTK, t_set_logp_BTK.to(s_BTK.dtype), log_zero)
    if s_tail_logp_BT is not None and t_tail_logp_BT is not None:
        s_BTK = torch.cat([s_BTK, s_tail_logp_BT.unsqueeze(-1)], dim=-1)
        t_BTK = torch.cat([t_BTK, t_tail_logp_BT.to(s_BTK.dtype).unsqueeze(-1)], dim=-1)
    elif renormalize:
        s_BTK = s_BTK - torch.logsumexp(s_BTK, dim=-1, keepdim=True)
        t_BTK = t_BTK - torch.logsumexp(t_BTK, dim=-1, keepdim=True)
    p_BTK, q_BTK = (s_BTK, t_BTK) if direction == "reverse" else (t_BTK, s_BTK)
    per_token_BT = (p_BTK.exp() * (p_BTK - q_BTK)).sum(dim=-1)
    # An empty intersection renormalised over nothing is uniform over log_zero slots for both
    # models (contributing 0 already); say so explicitly rather than rely on the cancellation.
    return torch.where(valid_BTK.any(dim=-1) | (s_tail_logp_BT is not None), per_token_BT, 0.0)


def topk_kl(
    student_logits_BTV: Tensor,
    teacher_logits_BTV: Tensor,
    mask_BT: Tensor,
    *,
    k: int,
    source: str = "teacher",
    renormalize: bool = True,
    tail: bool = False,
    direction: str = "reverse",
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """KL restricted to a per-position top-k token set (see the module docstring).

    Args:
        student_logits_BTV: [B, T, V] student logits.
        teacher_logits_BTV: [B, T, V] teacher logits.
        mask_BT: [B, T] bool, valid tokens.
        k: top-k size, 1 <= k <= V.
        source: "student" | "teacher" | "union" | "intersection".
        renormalize: renormalise both models inside the set (ignored when tail=True).
        tail: add one bucket holding each model's mass outside the set.
        direction: "reverse" = KL(S || T), "forward" = KL(T || S).
        temperature: both models' logits are divided by it before the softmax.
        reduction: "mean" | "sum" | "none", see `uniopd.algo.losses.dense.reduce_tokens`.

    Returns:
        Scalar ([B, T] for reduction="none").
    """
    check_logits_pair(student_logits_BTV, teacher_logits_BTV, mask_BT)
    _validate(direction, temperature)
    vocab_size = student_logits_BTV.shape[-1]
    if not 1 <= k <= vocab_size:
        raise ValueError(f"k must be in [1, V={vocab_size}], got {k}")
    s_z_BTV = _tempered(student_logits_BTV, temperature)
    t_z_BTV = _tempered(teacher_logits_BTV, temperature)
    ids_BTK, valid_BTK = _token_set(s_z_BTV.detach(), t_z_BTV.detach(), k, source)
    # Gathered logits minus log-sum-exp: avoids a full [B, T, V] log_softmax per model.
    s_lse_BT = torch.logsumexp(s_z_BTV, dim=-1)
    t_lse_BT = torch.logsumexp(t_z_BTV, dim=-1)
    s_set_BTK = s_z_BTV.gather(-1, ids_BTK) - s_lse_BT.unsqueeze(-1)
    t_set_BTK = t_z_BTV.gather(-1, ids_BTK) - t_lse_BT.unsqueeze(-1)
    s_tail_BT = t_tail_BT = None
    if tail:
        in_set_BTV = _membership(ids_BTK, valid_BTK, vocab_size)
        s_tail_BT = _complement_logp(s_z_BTV, s_lse_BT, in_set_BTV)
        t_tail_BT = _complement_logp(t_z_BTV, t_lse_BT, in_set_BTV)
        # Set = whole vocabulary: both tails are empty; pin both to log_zero exactly.
        full_BT = in_set_BTV.all(dim=-1)
        s_tail_BT = torch.where(full_BT, s_tail_BT.new_tensor(_LOG_ZERO), s_tail_BT)
        t_tail_BT = torch.where(full_BT, t_tail_BT.new_tensor(_LOG_ZERO), t_tail_BT)
    per_token_BT = _set_kl(
        s_set_BTK, t_set_BTK, valid_BTK, s_tail_BT, t_tail_BT,
        renormalize=renormalize, direction=direction,
    )
    return reduce_tokens(per_token_BT, mask_BT, reduction)


def topk_kl_from_teacher_topk(
    student_logits_BTV: Tensor,
    teacher_topk_logp_BTK: Tensor,
    teacher_topk_ids_BTK: Tensor,
    mask_BT: Tensor,
    *,
    renormalize: bool = True,
    tail: bool = False,
    direction: str = "reverse",
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """topk_kl with source="teacher" when the teacher backend returns only its top-k.

    The teacher's tail mass is 1 - sum_K exp(teacher_topk_logp) (there is no complement to
    sum); it is floored at the smallest normal float when rounding pushes the returned mass
    to 1 while the student still has mass outside the set.

    Args:
        student_logits_BTV: [B, T, V] student logits (divided by `temperature`).
        teacher_topk_logp_BTK: [B, T, K] the teacher's FULL-vocabulary log-probs at its top-k
            ids, already at the wanted temperature (as vLLM / SGLang logprobs return them).
            Slots holding -inf are padding (fewer than K returned) and are ignored.
        teacher_topk_ids_BTK: [B, T, K] long, the matching token ids (distinct per position).
        mask_BT: [B, T] bool, valid tokens.
        renormalize, tail, direction, reduction: as in `topk_kl`.
        temperature: applied to the student's logits only.

    Returns:
        Scalar ([B, T] for reduction="none").
    """
    _validate(direction, temperature)
    if teacher_topk_logp_BTK.shape != teacher_topk_ids_BTK.shape:
        raise ValueError(
            f"teacher top-k log-probs {tuple(teacher_topk_logp_BTK.shape)} and ids "
            f"{tuple(teacher_topk_ids_BTK.shape)} must have the same shape"
        )
    if teacher_topk_ids_BTK.shape[:-1] != student_logits_BTV.shape[:-1]:
        raise ValueError(
            f"teacher top-k {tuple(teacher_topk_ids_BTK.shape)} does not match student logits "
            f"{tuple(student_logits_BTV.shape)} in [B, T]"
        )
    vocab_size = student_logits_BTV.shape[-1]
    s_z_BTV = _tempered(student_logits_BTV, temperature)
    t_logp_BTK = upcast(teacher_topk_logp_BTK).to(s_z_BTV.dtype)
    ids_BTK = teacher_topk_ids_BTK.long()
    valid_BTK = torch.isfinite(t_logp_BTK)
    s_lse_BT = torch.logsumexp(s_z_BTV, dim=-1)
    s_set_BTK = s_z_BTV.gather(-1, ids_BTK) - s_lse_BT.unsqueeze(-1)
    # Padding slots hold -inf: replace before any arithmetic so no NaN reaches the graph.
    t_set_BTK = torch.where(valid_BTK, t_logp_BTK, t_logp_BTK.new_tensor(_LOG_ZERO))
    s_tail_BT = t_tail_BT = None
    if tail:
        in_set_BTV = _membership(ids_BTK, valid_BTK, vocab_size)
        full_BT = in_set_BTV.all(dim=-1)
        log_zero = s_lse_BT.new_tensor(_LOG_ZERO)
        s_tail_BT = torch.where(full_BT, log_zero, _complement_logp(s_z_BTV, s_lse_BT, in_set_BTV))
        # -expm1(lse) = 1 - sum_K p, accurate when the mass is close to 1.
        t_mass_BT = -torch.expm1(torch.logsumexp(t_set_BTK, dim=-1))
        tiny = torch.finfo(t_mass_BT.dtype).tiny
        t_tail_BT = torch.where(full_BT, log_zero, t_mass_BT.clamp(min=tiny).log())
    per_token_BT = _set_kl(
        s_set_BTK, t_set_BTK, valid_BTK, s_tail_BT, t_tail_BT,
        renormalize=renormalize, direction=direction,
    )
    return reduce_tokens(per_token_BT, mask_BT, reduction)
