"""Sample → decode → verify, the one path every command collects rollouts through, and the
training step's collection with online correctness-aware balancing.

`sample_and_verify` is used by train, eval, offline balancing and generate: any rollout
engine, any verifier, text or vision-language prompts. `collect_step` adds what a training
step needs on top: plain OPD draws n rollouts per prompt. With `balance.online`:

* `balance.mode: select` draws ceil(oversample · n), draws groups that came out all-correct
  or all-incorrect again (up to `balance.max_resample` rounds, the new samples added to the
  pool), then `select_balanced` keeps n per group with correct:incorrect near
  `balance.ratio`. Groups still uniform are kept or dropped by `balance.keep_uniform`.
* `balance.mode: release` draws n and, per group, drops random rollouts of the larger
  outcome side down to the smaller side's count (`release_balance_weights`); dropped
  rollouts stay in the batch (`StepBatch.balance_keep_B` False) so they still count in the
  margins, but get no loss.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from uniopd.algo.balance import release_balance_weights, select_balanced
from uniopd.batch import Sample, StepBatch, make_batch, pad_rows, response_mask
from uniopd.config import BalanceConfig
from uniopd.data.records import PromptRecord
from uniopd.rewards import verify_batch
from uniopd.rollout.base import RolloutEngine


@dataclass
class ResponseVerifier:
    """Decodes responses and grades them with each record's verifier."""

    tokenizer: object
    domain_verifiers: dict[str, str] | None = None

    def __call__(self, records: list[PromptRecord], samples: list[Sample]) -> tuple[list[str], torch.Tensor,
                                                                                     torch.Tensor]:
        """(texts, correct_B bool, score_B float32) for one row per sample."""
        if not samples:  # some tokenizers decode an empty batch as one empty text
            return [], torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.float32)
        texts = self.tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
        outcomes = verify_batch(texts, records, domain_defaults=self.domain_verifiers or None)
        return (texts, torch.tensor([o.correct for o in outcomes], dtype=torch.bool),
                torch.tensor([o.score for o in outcomes], dtype=torch.float32))


@dataclass
class Rollouts:
    """Verified rollouts, one row per response, grouped by prompt (`group_ids_B`)."""

    records: list[PromptRecord]
    samples: list[Sample]
    group_ids_B: torch.Tensor
    texts: list[str]
    correct_B: torch.Tensor
    score_B: torch.Tensor
    verify_seconds: float


def sample_and_verify(engine: RolloutEngine, records: list[PromptRecord], prompt_ids: list[list[int]], n: int, *,
                      verifier: ResponseVerifier, vision=None, greedy: bool = False,
                      generator: torch.Generator | None = None) -> Rollouts:
    """n rollouts per prompt from `engine`, decoded and verified.

    vision: a vision-language student's `StudentVision` (its per-record image inputs go to
    the engine), None for text.
    """
    groups = engine.sample(prompt_ids, n, multimodal=vision.inputs(records) if vision else None, greedy=greedy,
                           generator=generator)
    t = time.perf_counter()
    recs, samples, gids = make_batch(records, groups)
    texts, correct, score = verifier(recs, samples)
    return Rollouts(recs, samples, gids, texts, correct, score, time.perf_counter() - t)


def _uniform_groups(groups_correct: list[list[bool]]) -> list[int]:
    return [g for g, c in enumerate(groups_correct) if c and (all(c) or not any(c))]


def collect_step(engine: RolloutEngine, records: list[PromptRecord], prompt_ids: list[list[int]], *, n: int,
                 balance: BalanceConfig, verifier: ResponseVerifier, vision=None,
                 generator: torch.Generator | None = None,
                 generator_cpu: torch.Generator | None = None) -> tuple[StepBatch, dict[str, float]]:
    """One training step's rollouts as a StepBatch (+ balancing metrics and `time/verify`).

    generator: the sampling stream; generator_cpu: the balancing choices' stream.
    """
    select = balance.online and balance.mode == "select"
    n_draw = max(n, math.ceil(balance.oversample * n)) if select else n
    first = sample_and_verify(engine, records, prompt_ids, n_draw, verifier=verifier, vision=vision,
                              generator=generator)
    recs, samples, gids, correct, score = first.records, first.samples, first.group_ids_B, first.correct_B, first.score_B
    verify_time = first.verify_seconds
    metrics: dict[str, float] = {}
    balance_keep_B = None
    if balance.online and not select:
        balance_keep_B = release_balance_weights(correct, gids, generator=generator_cpu) > 0
        metrics["balance/drawn"] = float(len(samples))
        metrics["balance/kept"] = float(balance_keep_B.sum())
    if select:
        groups: list[list[Sample]] = [[] for _ in records]
        per_group_correct: list[list[bool]] = [[] for _ in records]
        per_group_score: list[list[float]] = [[] for _ in records]
        for g, sample, c, s in zip(gids.tolist(), samples, correct.tolist(), score.tolist()):
            groups[g].append(sample)
            per_group_correct[g].append(c)
            per_group_score[g].append(s)
        resampled = 0
        for _ in range(balance.max_resample):
            redo = _uniform_groups(per_group_correct)
            if not redo and not engine.collective:  # a collective engine's other processes may still draw
                break
            resampled += len(redo)
            extra = sample_and_verify(engine, [records[g] for g in redo], [prompt_ids[g] for g in redo], n_draw,
                                      verifier=verifier, vision=vision, generator=generator)
            verify_time += extra.verify_seconds
            for local, sample, c, s in zip(extra.group_ids_B.tolist(), extra.samples, extra.correct_B.tolist(),
                                           extra.score_B.tolist()):
                g = redo[local]
                groups[g].append(sample)
                per_group_correct[g].append(c)
                per_group_score[g].append(s)
        recs, samples, gids = make_batch(records, groups)
        correct = torch.tensor([c for cs in per_group_correct for c in cs], dtype=torch.bool)
        score = torch.tensor([s for ss in per_group_score for s in ss], dtype=torch.float32)
        keep = select_balanced(correct, gids, n_per_group=n, ratio=balance.ratio, generator=generator_cpu)
        if not balance.keep_uniform:
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
                      old_logp_BT=pad_rows([s.logprobs for s in samples]), correct_B=correct, score_B=score,
                      balance_keep_B=balance_keep_B)
    return batch, metrics
