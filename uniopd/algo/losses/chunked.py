"""Memory-bounded driver for the dense losses, and the name registry the trainer picks from.

A dense loss needs both models' logits over the whole vocabulary. At V = 150k and 4 x 512
tokens one [N, V] float32 logits tensor is 1.2 GB, and autograd keeps several per model
(logits, log-probs, probabilities). The driver never builds them for all N at once: it works
on the final hidden states and the lm_head weights and, per chunk of C tokens,

    z_S = h_S[c] W_S^T      (grad)        z_T = h_T[c] W_T^T      (no grad)
    s_c = loss_fn(z_S, z_T, reduction="sum")

and returns sum_c s_c / N_valid, which equals the unchunked token-mean exactly (up to float
summation order). Each chunk runs under `torch.utils.checkpoint` (non-reentrant): the forward
keeps only the chunk's hidden states, and the backward recomputes one chunk's logits at a
time, so peak memory is O(C * V) whatever N is. The price is one extra pair of matmuls and
one extra loss forward per chunk in the backward (the teacher's logits are recomputed too,
under no_grad).

Sizing: forward + backward peaks at about 8 (reverse / forward / mix KL) to 11 (JSD) float32
[C, V] tensors. Measured on CPU at V = 150k, N = 2048, H = 64, reverse KL: +600 MB at C = 128,
+1.1 GB at C = 256, +2.1 GB at C = 512 (the default, sized for GPUs); unchunked, an
estimated ~10 GB (8 x 1.2 GB). Pick C from the memory budget: C ~ budget / (8 * 4 bytes * V).

What it does not do: lm_head biases and final-logit soft-capping (Gemma-2's tanh cap) are
not applied; models that have them need their logits adapted before a loss sees them.
Student and teacher heads may differ in hidden size H but must share the vocabulary V
(pad or slice a head to a common vocabulary before calling).

Registry: `DENSE_LOSSES[kind]` for `loss.kind` in {"full_forward", "full_reverse", "jsd",
"mix", "topk"}; every entry has the signature
`fn(student_logits_BTV, teacher_logits_BTV, mask_BT, *, <options>, reduction="mean")`.
`dense_loss(kind, ...)` calls one on in-memory logits, `chunked_dense_loss` accepts either a
kind or a callable as `loss_fn`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from uniopd.algo.losses.dense import forward_kl, generalized_jsd, mixed_kl, reverse_kl, upcast
from uniopd.algo.losses.topk import topk_kl, topk_kl_from_teacher_topk
from uniopd.cpu.packed import can_pack, linear, pack

__all__ = [
    "DENSE_LOSSES",
    "TOKEN_LOGPROBS_KEEP_BYTES",
    "chunked_dense_loss",
    "chunked_token_logprobs",
    "dense_loss",
    "chunked_topk_logprobs",
    "chunked_teacher_topk_loss",
    "iter_logit_chunks",
    "resolve_dense_loss",
]

LossFn = Callable[..., Tensor]

DENSE_LOSSES: dict[str, LossFn] = {
    "full_forward": forward_kl,  # KL(T || S); options: temperature
    "full_reverse": reverse_kl,  # KL(S || T); options: temperature
    "jsd": generalized_jsd,  # options: beta, temperature
    "mix": mixed_kl,  # options: forward_weight, temperature
    "topk": topk_kl,  # options: k, source, renormalize, tail, direction, temperature
}


def resolve_dense_loss(loss: str | LossFn) -> LossFn:
    """A registered kind name -> its function; a callable is returned unchanged."""
    if callable(loss):
        return loss
    try:
        return DENSE_LOSSES[loss]
    except KeyError:
        raise ValueError(
            f"unknown dense loss kind {loss!r}; expected one of {sorted(DENSE_LOSSES)}"
        ) from None


def dense_loss(
    kind: str, student_logits_BTV: Tensor, teacher_logits_BTV: Tensor, mask_BT: Tensor, **opts
) -> Tensor:
    """Call the dense loss registered as `kind` on in-memory [B, T, V] logits.

    Args:
        kind: a key of DENSE_LOSSES.
        student_logits_BTV, teacher_logits_BTV: [B, T, V].
        mask_BT: [B, T] bool.
        **opts: the loss's keyword options (and `reduction`).

    Returns:
        Scalar token-mean (by default).
    """
    return resolve_dense_loss(kind)(student_logits_BTV, teacher_logits_BTV, mask_BT, **opts)


def _check_driver_inputs(
    student_hidden_NH: Tensor,
    student_head_VH: Tensor,
    teacher_hidden_NH: Tensor,
    teacher_head_VH: Tensor,
    mask_N: Tensor | None,
    chunk_size: int,
) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if student_hidden_NH.dim() != 2 or teacher_hidden_NH.dim() != 2:
        raise ValueError("hidden states must be flattened to [N, H]")
    if student_hidden_NH.shape[0] != teacher_hidden_NH.shape[0]:
        raise ValueError(
            f"student and teacher have {student_hidden_NH.shape[0]} and "
            f"{teacher_hidden_NH.shape[0]} token positions; they must match"
        )
    if student_hidden_NH.shape[1] != student_head_VH.shape[1]:
        raise ValueError("student hidden size does not match the student head [V, H]")
    if teacher_hidden_NH.shape[1] != teacher_head_VH.shape[1]:
        raise ValueError("teacher hidden size does not match the teacher head [V, H]")
    if student_head_VH.shape[0] != teacher_head_VH.shape[0]:
        raise ValueError(
            f"student vocabulary {student_head_VH.shape[0]} != teacher vocabulary "
            f"{teacher_head_VH.shape[0]}; slice or pad the heads to a common vocabulary"
        )
    if mask_N is not None and tuple(mask_N.shape) != (student_hidden_NH.shape[0],):
        raise ValueError(f"mask_N must be [N], got {tuple(mask_N.shape)}")


def _select_valid(x_NH: Tensor, mask_N: Tensor | None) -> Tensor:
    if mask_N is None:
        return x_NH
    return x_NH[mask_N.to(device=x_NH.device, dtype=torch.bool)]


def _chunk_loss_sum(
    s_hidden_CH: Tensor,
    s_head_VH: Tensor,
    t_hidden_CH: Tensor,
    t_head_VH: Tensor,
    *,
    loss_fn: LossFn,
    loss_kwargs: dict,
) -> Tensor:
    """Sum of the loss over one chunk of C (all valid) tokens, as a B=1, T=C batch."""
    s_logits_1CV = linear(s_hidden_CH, s_head_VH).unsqueeze(0)
    with torch.no_grad():
        t_logits_1CV = linear(t_hidden_CH, t_head_VH).unsqueeze(0)
    mask_1C = torch.ones(s_logits_1CV.shape[:2], dtype=torch.bool, device=s_logits_1CV.device)
    return loss_fn(s_logits_1CV, t_logits_1CV, mask_1C, reduction="sum", **loss_kwargs)


def chunked_dense_loss(
    student_hidden_NH: Tensor,
    student_head_VH: Tensor,
    teacher_hidden_NH: Tensor,
    teacher_head_VH: Tensor,
    mask_N: Tensor | None,
    loss_fn: str | LossFn,
    *,
    chunk_size: int = 512,
    **loss_kwargs,
) -> Tensor:
    """Token-mean dense loss over N positions, one chunk of logits alive at a time.

    Args:
        student_hidden_NH: [N, H_S] student final hidden states (after the final norm).
        student_head_VH: [V, H_S] student lm_head weight.
        teacher_hidden_NH: [N, H_T] teacher final hidden states (no grad needed).
        teacher_head_VH: [V, H_T] teacher lm_head weight.
        mask_N: [N] bool, valid positions (None: all). Invalid ones are dropped before
            chunking, so chunks hold only tokens that count.
        loss_fn: a DENSE_LOSSES kind or a callable with the dense-loss signature and a
            `reduction="sum"` option.
        chunk_size: tokens per chunk C; peak extra memory is ~8-11 float32 [C, V] tensors.
        **loss_kwargs: options for the loss (temperature, beta, k, ...), not `reduction`.

    Returns:
        Scalar float32 (float64 for float64 inputs): sum of per-token losses / N_valid;
        0.0 attached to the student's graph when no position is valid.
    """
    if "reduction" in loss_kwargs:
        raise ValueError("chunked_dense_loss always reduces with a token-mean; drop `reduction`")
    _check_driver_inputs(
        student_hidden_NH, student_head_VH, teacher_hidden_NH, teacher_head_VH, mask_N, chunk_size
    )
    fn = functools.partial(
        _chunk_loss_sum, loss_fn=resolve_dense_loss(loss_fn), loss_kwargs=loss_kwargs
    )
    s_hidden_NH = _select_valid(student_hidden_NH, mask_N)
    t_hidden_NH = _select_valid(teacher_hidden_NH, mask_N)
    needs_grad = torch.is_grad_enabled() and (
        s_hidden_NH.requires_grad or student_head_VH.requires_grad
    )
    # Empty slices keep the result on the student's graph even when there is no chunk.
    total = upcast(s_hidden_NH[:0].sum() + student_head_VH[:0].sum())
    n_valid = s_hidden_NH.shape[0]
    for start in range(0, n_valid, chunk_size):
        args = (
            s_hidden_NH[start : start + chunk_size],
            student_head_VH,
            t_hidden_NH[start : start + chunk_size],
            teacher_head_VH,
        )
        if needs_grad:
            # No RNG in the chunk; skipping RNG state stashing saves a device sync per chunk.
            chunk_sum = checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            chunk_sum = fn(*args)
        total = total + chunk_sum
    return total / max(n_valid, 1)


# Bytes of [C, V] softmax probabilities one `chunked_token_logprobs` call may keep from its
# forward for its backward; chunks past it recompute their logits in the backward instead.
TOKEN_LOGPROBS_KEEP_BYTES = 256 * 2**20
# Rows from which a trainable CPU head is packed for oneDNN once per call (forward and any
# recompute): at 512 rows x 49k x 384 the pack cost 16 ms and the forward matmul went
# from 177 to 102 ms. The weight cannot change between the forward and its backward.
PACK_HEAD_MIN_ROWS = 128


def _head_token_logprobs(
    hidden_CH: Tensor, head_VH: Tensor, ids_C: Tensor, temperature: float, *, want_probs: bool,
    packed: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """log softmax(h W^T / τ)[id] for one chunk, and (want_probs) the softmax itself.

    Works in place on the one [C, V] logits buffer the matmul returns: a fresh 100 MB
    tensor costs more on CPU (page faults) than the arithmetic done on it, and
    `torch.logsumexp` or `log_softmax` would allocate one or two more.
    """
    logits_CV = upcast(linear(hidden_CH, head_VH, packed=packed))
    if temperature != 1.0:
        logits_CV.div_(temperature)
    picked_C = logits_CV.gather(-1, ids_C.unsqueeze(-1)).squeeze(-1)
    max_C1 = logits_CV.amax(-1, keepdim=True)
    exp_CV = logits_CV.sub_(max_C1).exp_()
    sum_C1 = exp_CV.sum(-1, keepdim=True)
    logp_C = picked_C - (max_C1 + sum_C1.log()).squeeze(-1)
    return logp_C, (exp_CV.div_(sum_C1) if want_probs else None)


class _HeadTokenLogprobs(torch.autograd.Function):
    """One chunk of `chunked_token_logprobs` with a hand-written backward.

        d log p(id) / d z = (onehot(id) - softmax(z)) / τ,   z = h W^T / τ

    The forward keeps the chunk's softmax (one [C, V] buffer) when `keep`, else only h and
    W, and the backward recomputes it (what a checkpoint would do, minus autograd's extra
    [C, V] temporaries). The backward turns that buffer into dL/dz in place and applies
    two matmuls: dL/dh = dz W, dL/dW = dz^T h.
    """

    @staticmethod
    def forward(ctx, hidden_CH, head_VH, ids_C, temperature, keep, packed):  # noqa: D102
        logp_C, probs_CV = _head_token_logprobs(hidden_CH, head_VH, ids_C, temperature, want_probs=keep,
                                                packed=packed)
        ctx.save_for_backward(hidden_CH, head_VH, ids_C)
        ctx.temperature = temperature
        ctx.packed = None if keep else packed
        ctx.probs_CV = probs_CV  # used up (in place) by the first backward
        return logp_C

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_C):  # noqa: D102
        hidden_CH, head_VH, ids_C = ctx.saved_tensors
        probs_CV, ctx.probs_CV = ctx.probs_CV, None
        if probs_CV is None:  # not kept, or a second backward (retain_graph)
            _, probs_CV = _head_token_logprobs(hidden_CH, head_VH, ids_C, ctx.temperature, want_probs=True,
                                               packed=ctx.packed)
        g_C1 = grad_C.to(probs_CV.dtype).unsqueeze(-1)
        dz_CV = probs_CV.mul_(g_C1.neg())
        dz_CV.scatter_add_(-1, ids_C.unsqueeze(-1), g_C1)
        if ctx.temperature != 1.0:
            dz_CV.div_(ctx.temperature)
        dz_CV = dz_CV.to(head_VH.dtype)
        grad_hidden = dz_CV @ head_VH if ctx.needs_input_grad[0] else None
        grad_head = dz_CV.T @ hidden_CH if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_head, None, None, None, None


def chunked_token_logprobs(
    hidden_NH: Tensor,
    head_VH: Tensor,
    ids_N: Tensor,
    *,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    keep_bytes: int | None = None,
) -> Tensor:
    """log softmax(hidden @ head^T / temperature) gathered at ids, chunk by chunk.

    No pass holds more than one chunk's [C, V] logits at a time. With a gradient, each
    chunk's softmax is kept for the backward while the call's total stays within
    `keep_bytes` (default TOKEN_LOGPROBS_KEEP_BYTES, 256 MiB); chunks past the budget are
    recomputed in the backward, as a checkpoint would. Values and gradients are the same
    either way.

    Args:
        hidden_NH: [N, H] final hidden states.
        head_VH: [V, H] lm_head weight.
        ids_N: [N] long, the token whose log-prob is wanted at each position.
        chunk_size: tokens per chunk.
        temperature: > 0, logits are divided by it.
        keep_bytes: memory budget for kept [C, V] softmax chunks (0: recompute every chunk).

    Returns:
        [N] log-probs, float32 (float64 for float64 inputs).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if hidden_NH.dim() != 2 or tuple(ids_N.shape) != (hidden_NH.shape[0],):
        raise ValueError(
            f"expected hidden [N, H] and ids [N], got {tuple(hidden_NH.shape)} "
            f"and {tuple(ids_N.shape)}"
        )
    budget = TOKEN_LOGPROBS_KEEP_BYTES if keep_bytes is None else keep_bytes
    needs_grad = torch.is_grad_enabled() and (hidden_NH.requires_grad or head_VH.requires_grad)
    ids_N = ids_N.to(device=hidden_NH.device, dtype=torch.long)
    itemsize = upcast(hidden_NH[:0]).element_size()
    packed = (pack(head_VH.detach()) if needs_grad and hidden_NH.shape[0] >= PACK_HEAD_MIN_ROWS
              and hidden_NH.dtype == torch.float32 and can_pack(head_VH) else None)
    pieces, kept = [], 0
    for start in range(0, hidden_NH.shape[0], chunk_size):
        args = (hidden_NH[start : start + chunk_size], head_VH, ids_N[start : start + chunk_size])
        if needs_grad:
            size = args[0].shape[0] * head_VH.shape[0] * itemsize
            keep = kept + size <= budget
            kept += size if keep else 0
            pieces.append(_HeadTokenLogprobs.apply(*args, temperature, keep, packed))
        else:
            pieces.append(_head_token_logprobs(*args, temperature, want_probs=False)[0])
    if not pieces:
        return upcast(hidden_NH.sum(dim=-1))  # [0], still on the graph
    return torch.cat(pieces)


@torch.no_grad()
def iter_logit_chunks(
    student_hidden_NH: Tensor,
    student_head_VH: Tensor,
    teacher_hidden_NH: Tensor,
    teacher_head_VH: Tensor,
    mask_N: Tensor | None = None,
    *,
    chunk_size: int = 512,
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Yield (student_logits_1CV, teacher_logits_1CV, mask_1C) per chunk of valid tokens.

    For no-grad consumers at full vocabulary size, e.g. `uniopd.algo.metrics`'
    `token_diagnostic_sums` per chunk, then `reduce_diagnostic_sums`.
    """
    _check_driver_inputs(
        student_hidden_NH, student_head_VH, teacher_hidden_NH, teacher_head_VH, mask_N, chunk_size
    )
    s_hidden_NH = _select_valid(student_hidden_NH, mask_N)
    t_hidden_NH = _select_valid(teacher_hidden_NH, mask_N)
    for start in range(0, s_hidden_NH.shape[0], chunk_size):
        s_logits_1CV = linear(s_hidden_NH[start : start + chunk_size], student_head_VH)[None]
        t_logits_1CV = linear(t_hidden_NH[start : start + chunk_size], teacher_head_VH)[None]
        mask_1C = torch.ones(s_logits_1CV.shape[:2], dtype=torch.bool, device=s_logits_1CV.device)
        yield s_logits_1CV, t_logits_1CV, mask_1C


@torch.no_grad()
def chunked_topk_logprobs(
    hidden_NH: Tensor,
    head_VH: Tensor,
    k: int,
    *,
    chunk_size: int = 1024,
    suppress_ids: list[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """The k most likely tokens per position and their full-vocabulary log-probs.

    Args:
        hidden_NH: [N, H] final hidden states; head_VH: [V, H] output weight.
        k: tokens per position (at most V).
        suppress_ids: tokens given probability 0 (the distribution restricted to the rest).

    Returns:
        (ids_NK long, logp_NK float32), sorted by descending log-prob: what a serving engine's
        top-k log-probs return, computed one [C, V] chunk at a time.
    """
    k = min(k, head_VH.shape[0])
    ids, logps = [], []
    for start in range(0, hidden_NH.shape[0], chunk_size):
        logits_CV = linear(hidden_NH[start : start + chunk_size], head_VH).float()
        if suppress_ids:
            logits_CV[:, suppress_ids] = float("-inf")
        top_CK = torch.log_softmax(logits_CV, dim=-1).topk(k, dim=-1)
        ids.append(top_CK.indices)
        logps.append(top_CK.values)
    if not ids:
        empty = hidden_NH.new_zeros((0, k))
        return empty.long(), empty.float()
    return torch.cat(ids), torch.cat(logps)


def _teacher_topk_chunk_sum(
    s_hidden_CH: Tensor, student_head_VH: Tensor, t_logp_CK: Tensor, t_ids_CK: Tensor, *, loss_kwargs: dict
) -> Tensor:
    s_logits_1CV = linear(s_hidden_CH, student_head_VH)[None]
    ones_1C = torch.ones(s_logits_1CV.shape[:2], dtype=torch.bool, device=s_logits_1CV.device)
    return topk_kl_from_teacher_topk(
        s_logits_1CV, t_logp_CK[None], t_ids_CK[None], ones_1C, reduction="sum", **loss_kwargs
    )


def chunked_teacher_topk_loss(
    student_hidden_NH: Tensor,
    student_head_VH: Tensor,
    teacher_topk_logp_NK: Tensor,
    teacher_topk_ids_NK: Tensor,
    mask_N: Tensor | None,
    *,
    chunk_size: int = 512,
    **loss_kwargs,
) -> Tensor:
    """Token-mean `topk_kl_from_teacher_topk` over N positions, one chunk of student logits
    alive at a time (checkpointed like `chunked_dense_loss`): the top-k loss for teachers
    that return only their top-k (served teachers).

    Args:
        student_hidden_NH: [N, H]; student_head_VH: [V, H].
        teacher_topk_logp_NK, teacher_topk_ids_NK: [N, K] the teacher's top-k.
        mask_N: [N] bool valid positions (None: all).
        **loss_kwargs: renormalize, tail, direction, temperature.
    """
    if "reduction" in loss_kwargs:
        raise ValueError("chunked_teacher_topk_loss always reduces with a token-mean; drop `reduction`")
    if teacher_topk_logp_NK.shape != teacher_topk_ids_NK.shape or teacher_topk_ids_NK.shape[0] != student_hidden_NH.shape[0]:
        raise ValueError(
            f"teacher top-k {tuple(teacher_topk_ids_NK.shape)} / {tuple(teacher_topk_logp_NK.shape)} "
            f"does not match {student_hidden_NH.shape[0]} student positions"
        )
    fn = functools.partial(_teacher_topk_chunk_sum, loss_kwargs=loss_kwargs)
    s_hidden_NH = _select_valid(student_hidden_NH, mask_N)
    t_logp_NK = _select_valid(teacher_topk_logp_NK, mask_N)
    t_ids_NK = _select_valid(teacher_topk_ids_NK, mask_N)
    needs_grad = torch.is_grad_enabled() and (s_hidden_NH.requires_grad or student_head_VH.requires_grad)
    total = upcast(s_hidden_NH[:0].sum() + student_head_VH[:0].sum())
    n_valid = s_hidden_NH.shape[0]
    for start in range(0, n_valid, chunk_size):
        args = (s_hidden_NH[start : start + chunk_size], student_head_VH, t_logp_NK[start : start + chunk_size],
                t_ids_NK[start : start + chunk_size])
        if needs_grad:
            total = total + checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            total = total + fn(*args)
    return total / max(n_valid, 1)
