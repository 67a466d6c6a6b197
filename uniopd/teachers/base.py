"""The teacher-scorer seam: what every teacher backend returns, and the registry that picks one.

A scorer takes prompt records and the student's response token ids and returns, for every
response token, the teacher's log-prob of that token under the teacher's view of the record
(`uniopd.teachers.views`); where it can, also the teacher's top-k (ids and log-probs) or its
final hidden states (with its output head, for dense losses and diagnostics).

Each scorer declares what it can return from its config alone (`outputs`), so a run checks,
before any model loads, that the loss and the diagnostics get what they need
(`uniopd.train.plan`). `teachers.<name>.backend` picks the scorer by name (`local`, `remote`, `cache`) or by
dotted path (`mypkg.teachers:MyScorer`, a subclass of `TeacherScorer`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from uniopd.batch import HIDDEN, LOGP, TEACHER_OUTPUTS, TOPK
from uniopd.config import ConfigError, TeacherConfig
from uniopd.data.records import PromptRecord
from uniopd.models.loading import LoadedModel
from uniopd.registry import resolve

__all__ = ["BACKEND_OPTIONS", "HIDDEN", "LOGP", "TEACHER_OUTPUTS", "TEACHER_SCORERS", "TOPK", "ScorerContext", "TeacherScorer",
           "TeacherScores", "TeacherServiceError", "scorer_class"]

TEACHER_SCORERS: dict[str, str] = {
    "local": "uniopd.teachers.local:LocalTeacher",
    "remote": "uniopd.teachers.remote:RemoteTeacher",
    "cache": "uniopd.teachers.cache:CachedTeacher",
    "vllm": "uniopd.teachers.vllm:VLLMTeacher",
}

# TeacherConfig keys only some backends read; each scorer lists those it reads in `options`.
BACKEND_OPTIONS = ("urls", "api", "served_model", "api_key_env", "timeout_s", "retries", "backoff_s",
                   "concurrency", "request_batch", "cache", "shard")


class TeacherServiceError(RuntimeError):
    """A teacher service cannot be used: no server answers at start-up, a server tokenises
    differently from the client, or a step's rows went unscored past `max_failed_share`."""


@dataclass
class TeacherScores:
    """Flat over the (sequence, token) pairs given, in order; N = total response tokens.

    ok_S: bool [sequences], False where the teacher gave no usable signal for that sequence (a
    server down, timing out, answering garbage); its tokens are still present in the flat
    tensors (zeros) so the caller can split by response lengths, but must not train on them.
    None: every sequence is ok. error: the first failure's reason, for the log and the stop message.
    metrics: backend-specific numbers for this call (`teacher/<name>/<key>` in the step's metrics).
    """

    logp_N: torch.Tensor
    hidden_NH: torch.Tensor | None = None
    topk_ids_NK: torch.Tensor | None = None
    topk_logp_NK: torch.Tensor | None = None
    ok_S: torch.Tensor | None = None
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class ScorerContext:
    """What a scorer may use to build itself."""

    student: LoadedModel  # tokenizer checks, self-distillation
    device: torch.device
    chunk_size: int = 1024  # tokens per chunk of the output head
    micro_batch_size: int = 16  # sequences per forward
    suppress_ids: list[int] = field(default_factory=list)  # tokens the student never samples
    preloaded: LoadedModel | None = None  # a model given in code (tests, the demo) instead of cfg.path
    strategy: Any = None  # the TrainingStrategy, which shards a frozen teacher (`teachers.<name>.shard`)


class TeacherScorer(ABC):
    """Scores student responses under one teacher. Built with `from_config`."""

    options: ClassVar[frozenset[str]] = frozenset()  # the BACKEND_OPTIONS keys this scorer reads
    # Every process must call `score` each step, even with no rows of its own (its forwards are
    # collectives across the data-parallel processes: a sharded teacher).
    collective: bool = False

    def __init__(self, name: str, cfg: TeacherConfig):
        self.name, self.cfg = name, cfg

    @classmethod
    def check_config(cls, cfg: TeacherConfig, key: str) -> None:
        """Before any model loads: refuse backend keys this scorer would not read (named by dotted key)."""
        for option in BACKEND_OPTIONS:
            if getattr(cfg, option) is not None and option not in cls.options:
                users = {"cache": "cache", "shard": "local"}.get(option, "remote")
                raise ConfigError(f"{key}.{option}={getattr(cfg, option)!r} is read by {key}.backend={users} only, "
                                  f"but {key}.backend={cfg.backend!r}; set the backend or remove the key")

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

    def check_want(self, want: frozenset[str]) -> None:
        """Refuse a request for outputs this scorer's config cannot give (`outputs`)."""
        unknown = set(want) - self.outputs(self.cfg)
        if unknown:
            raise ValueError(f"teacher {self.name!r} cannot return {sorted(unknown)} "
                             f"(it returns {sorted(self.outputs(self.cfg))})")

    def output_head(self) -> torch.Tensor:
        """[V, H] output weight matching the HIDDEN states (only for scorers that return them)."""
        raise NotImplementedError(f"teacher {self.name!r} returns no hidden states")

    def close(self) -> None:
        """Release what the scorer holds (connections, processes)."""


def scorer_class(name: str, cfg: TeacherConfig) -> type[TeacherScorer]:
    return resolve(f"teachers.{name}.backend", cfg.backend, TEACHER_SCORERS, base=TeacherScorer)
