"""The student update: mini-batches of rows, micro-batches for memory, one loss.

Each optimizer step sees `rows / trainer.mini_batches` responses; they are pushed through
the student `trainer.micro_batch_size` at a time with gradients accumulated, every
micro-batch's loss divided by the token count of its whole mini-batch so the result
equals one big token-mean batch. A non-finite loss or gradient norm skips the optimizer
step (the caller counts it), so one bad batch never reaches the weights or a checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from uniopd.algo.losses.chunked import chunked_dense_loss, chunked_teacher_topk_loss
from uniopd.algo.losses.registry import loss_kind
from uniopd.algo.losses.sampled import ppo_clip_loss
from uniopd.batch import StepBatch
from uniopd.config import LossConfig, TrainerConfig
from uniopd.models.forward import build_layout, output_head, response_logprobs
from uniopd.models.loading import LoadedModel
from uniopd.train.micro import micro_inputs
from uniopd.train.strategy import SingleProcess, TrainingStrategy


class MicroBatchOOM(RuntimeError):
    """Out of memory in one micro-batch; the message carries the sizes that caused it."""


@dataclass
class UpdateResult:
    metrics: dict[str, float]
    skipped_steps: int  # optimizer steps skipped for non-finite values


def _tokens_by_teacher(batch: StepBatch, rows: list[int], device: torch.device, *,
                       by_domain: bool = False, topk: bool = False) -> dict:
    """For each teacher (or each (teacher, domain) when by_domain): (indices into the
    micro-batch's flat tokens, the teacher's hidden states there [n, H_teacher]), over the
    rows whose teacher returned hidden states; with topk, (indices, (top-k ids [n, K],
    top-k log-probs [n, K])) over the rows whose teacher returned only its top-k.

    Teachers may differ in width, so their hidden states are only ever stacked per teacher.
    """
    index: dict = {}
    values: dict = {}
    offset = 0
    for r in rows:
        n = len(batch.samples[r].response_ids)
        value = batch.teacher_topk.get(r) if topk else batch.teacher_hidden.get(r)
        if value is not None:
            key = (batch.teacher_names[r], batch.records[r].domain) if by_domain else batch.teacher_names[r]
            index.setdefault(key, []).extend(range(offset, offset + n))
            values.setdefault(key, []).append(value)
        offset += n
    if topk:
        return {key: (torch.tensor(index[key], device=device),
                      (torch.cat([v[0] for v in values[key]]).to(device), torch.cat([v[1] for v in values[key]]).to(device)))
                for key in sorted(index)}
    return {key: (torch.tensor(index[key], device=device), torch.cat(values[key]).to(device))
            for key in sorted(index)}


def _dense_loss_sum(student_hidden_NH: torch.Tensor, student_head: torch.Tensor, batch: StepBatch, rows: list[int],
                    teacher_heads: dict[str, torch.Tensor], mask_N: torch.Tensor, cfg: LossConfig,
                    vocab_size: int) -> torch.Tensor:
    """Sum (not mean) of the configured dense loss over this micro-batch's tokens, per teacher:
    from the teacher's hidden states and head, or (top-k loss only) from its returned top-k."""
    name_kind, opts = loss_kind(cfg.kind).dense(cfg)
    total = student_hidden_NH.new_zeros((), dtype=torch.float32)
    for name, (idx_n, teacher_hidden_nH) in _tokens_by_teacher(batch, rows, mask_N.device).items():
        valid_n = mask_N[idx_n]
        n = int(valid_n.sum())
        if n:
            # Heads may be padded past the tokenizer differently; compare on the real vocabulary.
            mean = chunked_dense_loss(student_hidden_NH[idx_n], student_head[:vocab_size], teacher_hidden_nH,
                                      teacher_heads[name][:vocab_size], valid_n, name_kind,
                                      chunk_size=cfg.chunk_size, **opts)
            total = total + mean * n
    for name, (idx_n, (ids_nK, logp_nK)) in _tokens_by_teacher(batch, rows, mask_N.device, topk=True).items():
        valid_n = mask_N[idx_n]
        n = int(valid_n.sum())
        if n:
            # The teacher's top-k is sorted by log-prob: its first loss.topk entries are the loss's top-k.
            mean = chunked_teacher_topk_loss(student_hidden_NH[idx_n], student_head[:vocab_size],
                                             logp_nK[:, : cfg.topk], ids_nK[:, : cfg.topk], valid_n,
                                             chunk_size=cfg.chunk_size, renormalize=cfg.topk_renormalize,
                                             tail=cfg.topk_tail, direction=cfg.direction,
                                             temperature=cfg.temperature)
            total = total + mean * n
    return total


@torch.no_grad()
def _diagnostic_sums(student_hidden_NH: torch.Tensor, student_head: torch.Tensor, batch: StepBatch, rows: list[int],
                     teacher_heads: dict[str, torch.Tensor], mask_N: torch.Tensor, k: int, vocab_size: int,
                     chunk_size: int) -> list[tuple[str, dict[str, float]]]:
    """Top-k overlap, shared mass, entropies and full reverse KL on the visited states, chunked.

    Returns (domain, sums) pairs, so the caller can reduce them per domain and overall.
    """
    from uniopd.algo.metrics import token_diagnostic_sums

    out = []
    for (name, domain), (idx_n, teacher_hidden_nH) in _tokens_by_teacher(batch, rows, mask_N.device,
                                                                        by_domain=True).items():
        keep = mask_N[idx_n]
        s_hidden, t_hidden = student_hidden_NH[idx_n][keep].detach(), teacher_hidden_nH[keep]
        for start in range(0, s_hidden.shape[0], chunk_size):
            s_logits = s_hidden[start:start + chunk_size] @ student_head[:vocab_size].T
            t_logits = t_hidden[start:start + chunk_size] @ teacher_heads[name][:vocab_size].T
            ones = torch.ones(1, s_logits.shape[0], dtype=torch.bool, device=s_logits.device)
            out.append((domain, token_diagnostic_sums(s_logits[None], t_logits[None], ones, k=min(k, vocab_size))))
    return out


def policy_update(student: LoadedModel, batch: StepBatch, optimizer: torch.optim.Optimizer, *,
                  loss_cfg: LossConfig, trainer_cfg: TrainerConfig, prompt_ids: list[list[int]],
                  temperature: float, teacher_heads: dict[str, torch.Tensor] | None = None,
                  diagnostics: bool = False, multimodal: list | None = None,
                  suppress_ids: list[int] | None = None, share_prefix: bool = True,
                  strategy: TrainingStrategy | None = None) -> UpdateResult:
    """teacher_heads: output heads of the teachers whose rows carry hidden states (dense
    losses and diagnostics); diagnostics run on those rows only.
    multimodal: per-row vision inputs of a vision-language student (None: text);
    suppress_ids: tokens the rollout never samples (see `uniopd.models.multimodal`);
    share_prefix: run prompt tokens that rows of a micro-batch share once (`uniopd.models.prefix`);
    strategy: how gradient norms are reduced (default: one process)."""
    strategy = strategy or SingleProcess()
    model = student.model
    device = next(model.parameters()).device
    assert batch.adv_BT is not None and batch.keep_B is not None
    mask_BT = batch.mask_BT & batch.keep_B[:, None]
    rows = [b for b in range(batch.size) if bool(mask_BT[b].any())]
    dense = loss_kind(loss_cfg.kind).is_dense
    diag_sums: list[tuple[str, dict[str, float]]] = []
    sums = {"loss": 0.0, "pg_loss": 0.0, "dense_loss": 0.0, "clip_frac": 0.0, "approx_kl": 0.0,
            "grad_norm": 0.0}
    n_opt, skipped = 0, 0
    parallel = strategy.world_size > 1  # then every process takes part in every optimizer step
    if not rows and not parallel:
        return UpdateResult({"update/rows": 0.0}, 0)
    model.train()
    per_mini = max(1, math.ceil(len(rows) / trainer_cfg.mini_batches))
    n_minis = len(range(0, len(rows), per_mini))
    if parallel:
        n_minis = int(strategy.reduce_max(n_minis))
    seq_mean = loss_cfg.aggregation == "seq-mean-token-mean"
    # seq-mean-token-mean, as the release: each response's token losses over its whole length
    # (tokens the clip dropped count as 0), then a mean over responses, masked ones counting as 0.
    responses_B = torch.tensor([len(s.response_ids) for s in batch.samples], dtype=torch.float32)
    rows_with_tokens = int((responses_B > 0).sum())
    for m in range(n_minis):
        mini = rows[m * per_mini: (m + 1) * per_mini]
        n_tokens = float(mask_BT[mini].sum())
        n_seqs = rows_with_tokens * len(mini) / len(rows) if rows else 0.0
        if parallel:  # the token (or response) count of the whole mini-batch, over every process
            n_tokens, n_seqs = (strategy.reduce_sums({"a": n_tokens, "b": n_seqs})[k] for k in ("a", "b"))
        optimizer.zero_grad(set_to_none=True)
        finite = True
        micros = [mini[u: u + trainer_cfg.micro_batch_size] for u in range(0, len(mini), trainer_cfg.micro_batch_size)]
        if strategy.pads_micro_batches:  # sharded layers: each forward and backward is a collective
            micros += [[]] * (int(strategy.reduce_max(len(micros))) - len(micros))
        for micro in micros:
            if not micro:
                _empty_backward(model, student, device)
                continue
            try:
                layout, extra = micro_inputs(student, model, batch, prompt_ids, micro, multimodal, device,
                                             share_prefix=share_prefix)
                logp_N, hidden_NH = response_logprobs(model, layout, chunk_size=loss_cfg.chunk_size,
                                                      temperature=temperature, return_hidden=dense or diagnostics,
                                                      extra_inputs=extra, suppress_ids=suppress_ids)
                idx = (torch.tensor(micro)[layout.row_N.cpu()], layout.col_N.cpu())
                mask_N = mask_BT[idx].to(device)
                if diagnostics and m == 0:  # the states visited, before this step's update
                    diag_sums += _diagnostic_sums(hidden_NH, output_head(model), batch, micro, teacher_heads or {},
                                                  mask_N, loss_cfg.topk, student.vocab_size, loss_cfg.chunk_size)
                loss = logp_N.new_zeros(())
                if not dense or loss_cfg.outcome_weight:
                    # With a dense loss the sampled-token term carries only the outcome advantage.
                    adv_N = batch.adv_BT[idx].to(device)
                    weight_N = (1.0 / responses_B[idx[0]]).to(device) if seq_mean else None
                    if batch.is_weight_BT is not None:
                        is_weight_N = batch.is_weight_BT[idx].to(device)
                        weight_N = is_weight_N if weight_N is None else weight_N * is_weight_N
                    pg, stats = ppo_clip_loss(logp_N, batch.old_logp_BT[idx].to(device), adv_N, mask_N,
                                              clip_low=loss_cfg.clip_low, clip_high=loss_cfg.clip_high,
                                              normalizer=n_seqs if seq_mean else n_tokens, token_weight=weight_N)
                    loss = loss + pg
                    sums["pg_loss"] += pg.item()
                    share = float(mask_N.sum()) / max(n_tokens, 1.0)
                    sums["clip_frac"] += float(stats["clip_frac"]) * share
                    sums["approx_kl"] += float(stats["approx_kl"]) * share
                if dense:
                    d = _dense_loss_sum(hidden_NH, output_head(model), batch, micro, teacher_heads or {}, mask_N,
                                        loss_cfg, student.vocab_size) / max(n_tokens, 1.0)
                    loss = loss + loss_cfg.dense_weight * d
                    sums["dense_loss"] += d.item()
                if torch.isfinite(loss):
                    (loss if strategy.loss_scale == 1.0 else loss * strategy.loss_scale).backward()
            except torch.OutOfMemoryError as exc:
                lengths = [len(prompt_ids[r]) + len(batch.samples[r].response_ids) for r in micro]
                raise MicroBatchOOM(
                    f"out of memory in a micro-batch of {len(micro)} sequences (longest {max(lengths)} tokens, "
                    f"{sum(lengths)} in all, vocabulary {student.vocab_size}, loss.kind={loss_cfg.kind}, "
                    f"loss.chunk_size={loss_cfg.chunk_size}); lower trainer.micro_batch_size or "
                    f"loss.chunk_size, or enable model.gradient_checkpointing") from exc
            if not torch.isfinite(loss):
                finite = False
                if not strategy.pads_micro_batches:
                    break
                continue
            sums["loss"] += loss.item()
        if parallel:
            finite = not strategy.reduce_max(float(not finite))
            strategy.sync_gradients(model)
        grad_norm = strategy.clip_grad_norm(model, trainer_cfg.grad_clip if trainer_cfg.grad_clip > 0 else float("inf"))
        if not finite or not torch.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            skipped += 1
            continue
        optimizer.step()
        sums["grad_norm"] += float(grad_norm)
        n_opt += 1
    optimizer.zero_grad(set_to_none=True)
    counts = {"update/rows": float(len(rows)), "update/tokens": float(mask_BT.sum())}
    if parallel:  # each process's share of a global mean; the gradient norm is already global
        sums = {**strategy.reduce_sums({k: v for k, v in sums.items() if k != "grad_norm"}),
                "grad_norm": sums["grad_norm"]}
        counts = strategy.reduce_sums(counts)
        diag_sums = [d for part in strategy.all_gather_objects(diag_sums) for d in part]
    metrics = {k: v / max(n_opt, 1) for k, v in sums.items()}
    if diag_sums:
        from uniopd.algo.metrics import reduce_diagnostic_sums

        metrics.update(reduce_diagnostic_sums(sums for _, sums in diag_sums))
        for domain in sorted({d for d, _ in diag_sums}):
            per_domain = reduce_diagnostic_sums(sums for d, sums in diag_sums if d == domain)
            metrics.update({f"domain/{domain}/{key.removeprefix('diag/')}": value
                            for key, value in per_domain.items() if key != "diag/num_tokens"})
    metrics.update(counts)
    return UpdateResult(metrics, skipped)


def _empty_backward(model: torch.nn.Module, student: LoadedModel, device: torch.device) -> None:
    """A forward and backward of one padding token with zero loss: a process with fewer
    micro-batches still takes part in each sharded layer's collectives."""
    pad = student.tokenizer.pad_token_id
    layout = build_layout([[pad]], [[pad]], pad, device)
    logp_N, _ = response_logprobs(model, layout)
    (logp_N.sum() * 0.0).backward()
