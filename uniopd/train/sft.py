"""Supervised fine-tuning on (prompt, response) pairs: loss on the response tokens only.

Used by `uniopd sft` (off-policy cold start on teacher-generated responses) and by the
demo to build its teacher and student. Reuses the OPD forward path, so the output head is
applied in chunks and memory stays bounded on large vocabularies.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch

from uniopd.config import SFTConfig
from uniopd.models.forward import build_layout, response_logprobs
from uniopd.models.loading import LoadedModel


def sft_train(loaded: LoadedModel, pairs: list[tuple[list[int], list[int]]], cfg: SFTConfig, *, seed: int = 0,
              chunk_size: int = 1024, progress: bool = True,
              should_stop: Callable[[int], bool] | None = None) -> list[float]:
    """Train on pairs of (prompt ids, response ids incl. EOS). Returns the loss per step.

    `should_stop(steps_done)` runs after every optimizer step; when it returns True training
    ends there (the learning-rate schedule still spans `cfg.steps`). The demo uses it to stop
    a build once held-out-style validation accuracy reaches a target, so the model lands at a
    known strength whatever trajectory SFT takes.
    """
    model = loaded.model
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = random.Random(seed)
    order: list[int] = []
    losses = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc="sft", unit="step")
    model.train()
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:
            fresh = list(range(len(pairs)))
            rng.shuffle(fresh)
            order.extend(fresh)
        idx, order = order[: cfg.batch_size], order[cfg.batch_size:]
        layout = build_layout([pairs[i][0] for i in idx], [pairs[i][1] for i in idx],
                              loaded.tokenizer.pad_token_id, device)
        logp_N, _ = response_logprobs(model, layout, chunk_size=chunk_size)
        loss = -logp_N.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if should_stop is not None and should_stop(step + 1):
            break
    if bar:
        bar.close()
    model.eval()
    return losses
