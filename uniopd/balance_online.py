"""Collect a step's rollouts, with online correctness-aware balancing when enabled.

Plain OPD: n rollouts per prompt, verified. With `balance.online`: draw
ceil(oversample · n) per prompt; groups that came out all-correct or all-incorrect are
drawn again (up to `balance.max_resample` rounds, the new samples added to the pool); then
`select_balanced` keeps n per group with correct:incorrect near `balance.ratio`. Groups
still uniform are kept or dropped by `balance.keep_uniform`.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import torch

from uniopd.batch import StepBatch, make_batch, pad_rows, response_mask

if TYPE_CHECKING:
    from uniopd.trainer import Trainer


def _uniform_groups(groups_correct: list[list[bool]]) -> list[int]:
    return [g for g, c in enumerate(groups_correct) if c and (all(c) or not any(c))]


def collect_balanced(trainer: "Trainer", indices: list[int]) -> tuple[StepBatch, dict[str, float]]:
    cfg, bcfg = trainer.cfg, trainer.cfg.balance
    n = cfg.rollout.n
    records = [trainer.records[i] for i in indices]
    n_draw = max(n, math.ceil(bcfg.oversample * n)) if bcfg.online else n
    groups = trainer.rollout(indices, n_draw)
    t = time.perf_counter()
    recs, samples, gids = make_batch(records, groups)
    correct, score = trainer.verify(recs, samples)
    verify_time = time.perf_counter() - t
    metrics: dict[str, float] = {}
    if bcfg.online:
        per_group_correct = [[] for _ in groups]
        per_group_score = [[] for _ in groups]
        for g, c, s in zip(gids.tolist(), correct.tolist(), score.tolist()):
            per_group_correct[g].append(c)
            per_group_score[g].append(s)
        resampled = 0
        for _ in range(bcfg.max_resample):
            redo = _uniform_groups(per_group_correct)
            if not redo:
                break
            resampled += len(redo)
            extra = trainer.rollout([indices[g] for g in redo], n_draw)
            t = time.perf_counter()
            e_recs, e_samples, e_gids = make_batch([records[g] for g in redo], extra)
            e_correct, e_score = trainer.verify(e_recs, e_samples)
            verify_time += time.perf_counter() - t
            for local, sample, c, s in zip(e_gids.tolist(), e_samples, e_correct.tolist(), e_score.tolist()):
                g = redo[local]
                groups[g].append(sample)
                per_group_correct[g].append(c)
                per_group_score[g].append(s)
        recs, samples, gids = make_batch(records, groups)
        correct = torch.tensor([c for cs in per_group_correct for c in cs], dtype=torch.bool)
        score = torch.tensor([s for ss in per_group_score for s in ss], dtype=torch.float32)
        from uniopd.algo.balance import select_balanced

        keep = select_balanced(correct, gids, n_per_group=n, ratio=bcfg.ratio, generator=trainer.generator_cpu)
        if not bcfg.keep_uniform:
            uniform = set(_uniform_groups([[c for c, g2 in zip(correct.tolist(), gids.tolist()) if g2 == g]
                                           for g in range(len(groups))]))
            keep = torch.tensor([int(i) for i in keep if int(gids[i]) not in uniform], dtype=torch.long)
        metrics["balance/drawn"] = float(len(samples))
        metrics["balance/kept"] = float(len(keep))
        metrics["balance/resampled_groups"] = float(resampled)
        recs = [recs[i] for i in keep.tolist()]
        samples = [samples[i] for i in keep.tolist()]
        gids, correct, score = gids[keep], correct[keep], score[keep]
    metrics["time/verify"] = verify_time
    batch = StepBatch(records=recs, samples=samples, group_ids_B=gids, mask_BT=response_mask(samples),
                      old_logp_BT=pad_rows([s.logprobs for s in samples]), correct_B=correct, score_B=score)
    return batch, metrics
