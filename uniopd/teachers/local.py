"""A colocated teacher: a frozen model in this process, scoring in inference mode.

score() returns log πT(y_t | teacher view, y<t) for every student response token, from one
forward pass over teacher-prompt + response per sequence. Micro-batched, and the output
head is applied in token chunks, so no [B, T, V] tensor is ever held.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from uniopd.config import TeacherConfig
from uniopd.data.records import PromptRecord
from uniopd.models.forward import build_layout, response_logprobs
from uniopd.models.loading import LoadedModel
from uniopd.models.prompts import render_prompt
from uniopd.teachers.views import teacher_view


@dataclass
class TeacherScores:
    logp_N: torch.Tensor  # flat, in the order of the (sequence, token) pairs given
    hidden_NH: torch.Tensor | None  # for dense losses: the teacher's final hidden states


class LocalTeacher:
    def __init__(self, name: str, cfg: TeacherConfig, loaded: LoadedModel, *, chunk_size: int = 1024,
                 micro_batch_size: int = 16):
        self.name, self.cfg, self.loaded = name, cfg, loaded
        self.chunk_size, self.micro_batch_size = chunk_size, micro_batch_size
        self._prompt_cache: dict[tuple[str, str], list[int]] = {}

    @property
    def model(self):
        return self.loaded.model

    def prompt_ids(self, record: PromptRecord) -> list[int]:
        key = (record.id, self.cfg.view)
        if key not in self._prompt_cache:
            view = teacher_view(record, self.cfg)
            self._prompt_cache[key] = render_prompt(self.loaded.tokenizer, view, chat_template=self.cfg.chat_template,
                                                    system_prompt=self.cfg.system_prompt)
        return self._prompt_cache[key]

    @torch.inference_mode()
    def score(self, records: list[PromptRecord], responses: list[list[int]], *,
              return_hidden: bool = False) -> TeacherScores:
        """Token log-probs of each response under this teacher's view of its record."""
        device = next(self.model.parameters()).device
        logps, hiddens = [], []
        for start in range(0, len(records), self.micro_batch_size):
            recs = records[start: start + self.micro_batch_size]
            resps = responses[start: start + self.micro_batch_size]
            layout = build_layout([self.prompt_ids(r) for r in recs], resps,
                                  self.loaded.tokenizer.pad_token_id, device)
            logp_N, hidden_NH = response_logprobs(self.model, layout, chunk_size=self.chunk_size,
                                                  return_hidden=return_hidden)
            logps.append(logp_N.float())
            if return_hidden:
                hiddens.append(hidden_NH)
        return TeacherScores(torch.cat(logps) if logps else torch.zeros(0),
                             torch.cat(hiddens) if return_hidden and hiddens else None)
