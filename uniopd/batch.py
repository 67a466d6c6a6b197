"""What flows between the phases of a step: `Sample` (one rollout, from any rollout engine)
and `StepBatch` (rollouts, outcomes and teacher scores as plain [B, T] tensors).

Everything after rollout works on one `StepBatch`: row b is one response, `group_ids_B`
says which prompt it came from, `mask_BT` marks its response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from uniopd.data.records import PromptRecord

# What a teacher scorer can return per response token (`uniopd.teachers.base`).
LOGP = "logp"  # log πT of the sampled token (every scorer)
TOPK = "topk"  # the teacher's top-k ids and their full-vocabulary log-probs
HIDDEN = "hidden"  # final hidden states and the output head (dense losses, diagnostics)
TEACHER_OUTPUTS = (LOGP, TOPK, HIDDEN)


@dataclass
class Sample:
    """One rollout: the response tokens and their log-probs under the sampling policy."""

    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    finished: bool  # ended with EOS (False: cut at max_new_tokens)
    extra: dict = field(default_factory=dict)


@dataclass
class StepBatch:
    records: list[PromptRecord]  # one per row (repeated across a group)
    samples: list[Sample]
    group_ids_B: torch.Tensor
    mask_BT: torch.Tensor
    old_logp_BT: torch.Tensor
    correct_B: torch.Tensor
    score_B: torch.Tensor
    teacher_names: list[str] = field(default_factory=list)
    teacher_logp_BT: torch.Tensor | None = None
    teacher_hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # row -> [T_b, H] (dense losses)
    # row -> (ids [T_b, K], log-probs [T_b, K]) from scorers that return only the teacher's top-k
    teacher_topk: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    adv_BT: torch.Tensor | None = None
    keep_B: torch.Tensor | None = None  # rows that train (calibration mask, online balancing)
    # Rows the online balancer lets train (release mode: the others stay for margins only); None: all.
    balance_keep_B: torch.Tensor | None = None
    # Rows whose teacher gave a usable signal (a served teacher can fail); None: all. The others get
    # zero advantage and stay out of the loss and the margins.
    teacher_ok_B: torch.Tensor | None = None
    # Per-token weight of the sampled-token loss: truncated importance sampling for rollouts an
    # engine drew whose log-probs differ from the trainer's (rollout.old_logprobs=engine); None: 1.
    is_weight_BT: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return len(self.samples)


def pad_rows(rows: list[list[float]], fill: float = 0.0, dtype=torch.float32) -> torch.Tensor:
    T = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), T), fill, dtype=dtype)
    for b, r in enumerate(rows):
        if r:
            out[b, : len(r)] = torch.tensor(r, dtype=dtype)
    return out


def make_batch(records: list[PromptRecord], groups: list[list[Sample]]) -> tuple[list[PromptRecord], list[Sample], torch.Tensor]:
    """Flatten prompt groups into rows; group id = the prompt's index in this step."""
    recs, samples, gids = [], [], []
    for g, (record, group) in enumerate(zip(records, groups)):
        for s in group:
            recs.append(record)
            samples.append(s)
            gids.append(g)
    return recs, samples, torch.tensor(gids, dtype=torch.long)


def response_mask(samples: list[Sample]) -> torch.Tensor:
    lengths = torch.tensor([len(s.response_ids) for s in samples])
    T = int(lengths.max()) if len(lengths) else 0
    return torch.arange(T)[None, :] < lengths[:, None]
