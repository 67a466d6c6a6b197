"""The teacher-scorer seam: what every teacher backend returns, and the registry that picks one.

A scorer takes prompt records and the student's response token ids and returns, for every
response token, the teacher's log-prob of that token under the teacher's view of the record
(`uniopd.teachers.views`); where it can, also the teacher's top-k (ids and log-probs) or its
final hidden states (with its output head, for dense losses and diagnostics).

Each scorer declares what it can return from its config alone (`outputs`), so a run checks,
before any model loads, that the loss and the diagnostics get what they need
(`uniopd.train.plan`). `teachers.<name>.backend` picks the scorer by name (`local`) or by
dotted path (`mypkg.teachers:MyScorer`, a subclass of `TeacherScorer`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from uniopd.batch import HIDDEN, LOGP, TEACHER_OUTPUTS, TOPK
from uniopd.config import TeacherConfig
from uniopd.data.records import PromptRecord
from uniopd.models.loading import LoadedModel
from uniopd.registry import resolve

__all__ = ["HIDDEN", "LOGP", "TEACHER_OUTPUTS", "TEACHER_SCORERS", "TOPK", "ScorerContext", "TeacherScorer",
           "TeacherScores", "scorer_class"]

TEACHER_SCORERS: dict[str, str] = {
    "local": "uniopd.teachers.local:LocalTeacher",
}


@dataclass
class TeacherScores:
    """Flat over the (sequence, token) pairs given, in order; N = total response tokens."""

    logp_N: torch.Tensor
    hidden_NH: torch.Tensor | None = None
    topk_ids_NK: torch.Tensor | None = None
    topk_logp_NK: torch.Tensor | None = None


@dataclass
class ScorerContext:
    """What a scorer may use to build itself."""

    student: LoadedModel  # tokenizer checks, self-distillation
    device: torch.device
    chunk_size: int = 1024  # tokens per chunk of the output head
    micro_batch_size: int = 16  # sequences per forward
    suppress_ids: list[int] = field(default_factory=list)  # tokens the student never samples
    preloaded: LoadedModel | None = None  # a model given in code (tests, the demo) instead of cfg.path


class TeacherScorer(ABC):
    """Scores student responses under one teacher. Built with `from_config`."""

    def __init__(self, name: str, cfg: TeacherConfig):
        self.name, self.cfg = name, cfg

    @classmethod
    @abstractmethod
    def outputs(cls, cfg: TeacherConfig) -> frozenset[str]:
        """What `score` can return for this config (a subset of TEACHER_OUTPUTS, always with LOGP)."""

    @classmethod
    def from_config(cls, name: str, cfg: TeacherConfig, ctx: ScorerContext) -> "TeacherScorer":
        return cls(name, cfg)

    @property
    def sees_images(self) -> bool:
        """True when the teacher reads a record's images itself (a vision-language teacher)."""
        return False

    @abstractmethod
    def score(self, records: list[PromptRecord], responses: list[list[int]], *,
              want: frozenset[str] = frozenset({LOGP})) -> TeacherScores:
        """Teacher scores of each response (token ids) under its view of the matching record.

        want: which of `outputs(cfg)` to return; LOGP always comes back.
        """

    def output_head(self) -> torch.Tensor:
        """[V, H] output weight matching the HIDDEN states (only for scorers that return them)."""
        raise NotImplementedError(f"teacher {self.name!r} returns no hidden states")

    def close(self) -> None:
        """Release what the scorer holds (connections, processes)."""


def scorer_class(name: str, cfg: TeacherConfig) -> type[TeacherScorer]:
    return resolve(f"teachers.{name}.backend", cfg.backend, TEACHER_SCORERS, base=TeacherScorer)
