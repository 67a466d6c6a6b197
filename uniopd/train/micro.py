"""The forward inputs of one micro-batch of a step: the packed layout of its rows and, for a
vision-language student, their image inputs. Shared by the update and by the recompute of
the old log-probs, so both run the student on exactly the same inputs."""

from __future__ import annotations

from typing import Any

import torch

from uniopd.batch import StepBatch
from uniopd.models.forward import build_layout
from uniopd.models.loading import LoadedModel


def micro_inputs(student: LoadedModel, model: torch.nn.Module, batch: StepBatch, prompt_ids: list[list[int]],
                 micro: list[int], multimodal: list | None, device: torch.device, *,
                 share_prefix: bool) -> tuple[Any, dict | None]:
    """(layout, extra_inputs) for rows `micro` of `batch`; extra_inputs is None for a text student."""
    layout = build_layout([prompt_ids[r] for r in micro], [batch.samples[r].response_ids for r in micro],
                          student.tokenizer.pad_token_id, device, share_prefix=share_prefix)
    extra = None
    if multimodal is not None:
        from uniopd.models.multimodal import layout_inputs

        extra = layout_inputs(model, layout, [multimodal[r] for r in micro], [len(prompt_ids[r]) for r in micro])
    return layout, extra
