"""A colocated teacher: a frozen model in this process, scoring in inference mode.

score() returns log πT(y_t | teacher view, y<t) for every student response token, from one
forward pass over teacher-prompt + response per sequence. Micro-batched, and the output
head is applied in token chunks, so no [B, T, V] tensor is ever held. On CPU in fp32 the
frozen teacher's linear layers and head run on oneDNN-packed copies of its weights
(`uniopd.models.packed`, packed on first use).

A vision-language teacher (its `LoadedModel.processor` set) renders its view with its
processor and sees the record's images (pixel values, M-RoPE positions) in that forward;
a text teacher renders the text view as before. `suppress_ids` (the student's image
placeholder tokens, never sampled) restricts the teacher's distribution the same way the
student's is restricted, so both are compared on the same support.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from uniopd.config import TeacherConfig
from uniopd.data.records import PromptRecord
from uniopd.models.forward import build_layout, response_logprobs
from uniopd.models.loading import LoadedModel
from uniopd.models.packed import packed_linears
from uniopd.models.prompts import render_prompt
from uniopd.teachers.views import teacher_images, teacher_view


@dataclass
class TeacherScores:
    logp_N: torch.Tensor  # flat, in the order of the (sequence, token) pairs given
    hidden_NH: torch.Tensor | None  # for dense losses: the teacher's final hidden states


class LocalTeacher:
    def __init__(self, name: str, cfg: TeacherConfig, loaded: LoadedModel, *, chunk_size: int = 1024,
                 micro_batch_size: int = 16, suppress_ids: list[int] | None = None):
        self.name, self.cfg, self.loaded = name, cfg, loaded
        self.chunk_size, self.micro_batch_size = chunk_size, micro_batch_size
        self.suppress_ids = list(suppress_ids or [])
        self._prompt_cache: dict[tuple[str, str], list[int]] = {}
        self._encoder = None
        if loaded.processor is not None:
            from uniopd.models.multimodal import PromptEncoder

            self._encoder = PromptEncoder(loaded.processor, chat_template=cfg.chat_template,
                                          system_prompt=cfg.system_prompt)

    @property
    def model(self):
        return self.loaded.model

    def vision_inputs(self, record: PromptRecord):
        """(ids, MultimodalInputs) of a vision-language teacher's view of the record."""
        view = teacher_view(record, self.cfg)
        return self._encoder((record.id, self.cfg.view), record.id, view, teacher_images(record, self.cfg))

    def prompt_ids(self, record: PromptRecord) -> list[int]:
        key = (record.id, self.cfg.view)
        if key not in self._prompt_cache:
            if self._encoder is not None:
                self._prompt_cache[key] = self.vision_inputs(record)[0]
                return self._prompt_cache[key]
            view = teacher_view(record, self.cfg)
            self._prompt_cache[key] = render_prompt(self.loaded.tokenizer, view, chat_template=self.cfg.chat_template,
                                                    system_prompt=self.cfg.system_prompt)
        return self._prompt_cache[key]

    @torch.inference_mode()
    def score(self, records: list[PromptRecord], responses: list[list[int]], *,
              return_hidden: bool = False) -> TeacherScores:
        """Token log-probs of each response under this teacher's view of its record."""
        with packed_linears(self.model):  # CPU fp32: oneDNN on weights packed once (uniopd.models.packed)
            return self._score(records, responses, return_hidden)

    def _score(self, records: list[PromptRecord], responses: list[list[int]], return_hidden: bool) -> TeacherScores:
        device = next(self.model.parameters()).device
        logps, hiddens = [], []
        for start in range(0, len(records), self.micro_batch_size):
            recs = records[start: start + self.micro_batch_size]
            resps = responses[start: start + self.micro_batch_size]
            prompts = [self.prompt_ids(r) for r in recs]
            layout = build_layout(prompts, resps, self.loaded.tokenizer.pad_token_id, device,
                                  share_prefix=self.cfg.share_prompt_prefix)
            extra = None
            if self._encoder is not None:
                from uniopd.models.multimodal import layout_inputs

                extra = layout_inputs(self.model, layout, [self.vision_inputs(r)[1] for r in recs],
                                      [len(p) for p in prompts])
            logp_N, hidden_NH = response_logprobs(self.model, layout, chunk_size=self.chunk_size,
                                                  return_hidden=return_hidden, extra_inputs=extra,
                                                  suppress_ids=self.suppress_ids or None)
            logps.append(logp_N.float())
            if return_hidden:
                hiddens.append(hidden_NH)
        return TeacherScores(torch.cat(logps) if logps else torch.zeros(0),
                             torch.cat(hiddens) if return_hidden and hiddens else None)
