"""A colocated teacher (`teachers.<name>.backend: local`): a frozen model in this process,
scoring in inference mode.

score() returns log πT(y_t | teacher view, y<t) for every student response token, from one
forward pass over teacher-prompt + response per sequence. Micro-batched, and the output
head is applied in token chunks, so no [B, T, V] tensor is ever held. It can also return
the final hidden states (dense losses and diagnostics apply its head to them) or, with
`top_k` set, only the teacher's top-k ids and log-probs per token, as a served teacher would.

On CPU in fp32 the frozen teacher's linear layers and head run on oneDNN-packed copies of
its weights (`uniopd.cpu.packed`), a choice made once when the scorer is built.

A vision-language teacher (its `LoadedModel.processor` set) renders its view with its
processor and sees the record's images (pixel values, M-RoPE positions) in that forward;
a text teacher renders the text view. `suppress_ids` (the student's image placeholder
tokens, never sampled) restricts the teacher's distribution the same way the student's is
restricted, so both are compared on the same support.
"""

from __future__ import annotations

import contextlib
import copy
import logging

import torch

from uniopd.algo.losses.chunked import chunked_topk_logprobs
from uniopd.config import ConfigError, TeacherConfig
from uniopd.cpu.packed import can_pack, packed_linears
from uniopd.data.records import PromptRecord
from uniopd.models.forward import base_model, build_layout, output_head, response_logprobs
from uniopd.models.loading import LoadedModel, check_vocabularies, load_model
from uniopd.teachers.base import HIDDEN, LOGP, TOPK, ScorerContext, TeacherScorer, TeacherScores
from uniopd.teachers.views import TeacherPrompts

log = logging.getLogger(__name__)


class LocalTeacher(TeacherScorer):
    options = frozenset({"shard"})

    def __init__(self, name: str, cfg: TeacherConfig, loaded: LoadedModel, *, chunk_size: int = 1024,
                 micro_batch_size: int = 16, suppress_ids: list[int] | None = None, strategy=None):
        """strategy: with `cfg.shard`, the data-parallel strategy that shards the model's layers."""
        super().__init__(name, cfg)
        self.loaded = loaded
        self.chunk_size, self.micro_batch_size = chunk_size, micro_batch_size
        self.suppress_ids = list(suppress_ids or [])
        self.strategy = None
        if cfg.shard:
            self.strategy = strategy
            if strategy is None:
                raise ConfigError(f"teachers.{name}.shard=true needs trainer.strategy=data_parallel")
            strategy.shard_frozen(loaded.model, f"teachers.{name}")
            self.collective = True
        # The view's token ids, rendered as a teacher server's client renders them.
        self.prompts = TeacherPrompts(cfg, loaded.tokenizer, loaded.processor)
        # CPU fast path, chosen once: fp32 linears on oneDNN-packed copies while scoring.
        self.packed = can_pack(output_head(self.model))

    @classmethod
    def check_config(cls, cfg: TeacherConfig, key: str) -> None:
        super().check_config(cfg, key)
        if cfg.shard and cfg.share_prompt_prefix:
            # Prefix sharing runs one or two forwards per micro-batch depending on its rows; a
            # sharded teacher's forwards are collectives and must match across processes.
            raise ConfigError(f"{key}.shard=true needs {key}.share_prompt_prefix=false")
        if cfg.shard and cfg.self_distill:
            raise ConfigError(f"{key}.shard=true with {key}.self_distill=true is not supported (the frozen copy "
                              f"is taken from the prepared student); remove {key}.shard")

    @classmethod
    def outputs(cls, cfg: TeacherConfig) -> frozenset[str]:
        return frozenset({LOGP, TOPK}) if cfg.top_k else frozenset({LOGP, HIDDEN})

    @classmethod
    def from_config(cls, name: str, cfg: TeacherConfig, ctx: ScorerContext) -> "LocalTeacher":
        if ctx.preloaded is not None:
            loaded = ctx.preloaded
        elif cfg.self_distill:
            student = ctx.student
            model = copy.deepcopy(student.model).eval().requires_grad_(False)
            loaded = LoadedModel(model, student.tokenizer, f"{student.source} (frozen copy)",
                                 processor=student.processor)
        else:
            loaded = load_model(cfg, f"teachers.{name}", device=ctx.device, trainable=False)
        check_vocabularies(ctx.student, loaded, name)
        return cls(name, cfg, loaded, chunk_size=ctx.chunk_size, micro_batch_size=ctx.micro_batch_size,
                   suppress_ids=ctx.suppress_ids, strategy=ctx.strategy)

    @property
    def model(self):
        return self.loaded.model

    @property
    def sees_images(self) -> bool:
        return self.loaded.is_multimodal

    def output_head(self) -> torch.Tensor:
        return output_head(self.model)

    def vision_inputs(self, record: PromptRecord):
        """(ids, MultimodalInputs) of a vision-language teacher's view of the record."""
        return self.prompts.vision_inputs(record)

    def prompt_ids(self, record: PromptRecord) -> list[int]:
        return self.prompts.ids(record)

    @torch.inference_mode()
    def score(self, records: list[PromptRecord], responses: list[list[int]], *,
              want: frozenset[str] = frozenset({LOGP})) -> TeacherScores:
        """Token scores of each response under this teacher's view of its record."""
        self.check_want(want)
        with packed_linears(self.model) if self.packed else contextlib.nullcontext():
            return self._score(records, responses, HIDDEN in want, TOPK in want)

    def _score(self, records: list[PromptRecord], responses: list[list[int]], want_hidden: bool,
               want_topk: bool) -> TeacherScores:
        device = next(self.model.parameters()).device
        logps, hiddens, topk_ids, topk_logps = [], [], [], []
        pad = 0
        if self.strategy is not None:  # sharded: every process runs as many forwards as the busiest one
            micro_batches = -(-len(records) // self.micro_batch_size)
            pad = int(self.strategy.reduce_max(float(micro_batches))) - micro_batches
        for start in range(0, len(records), self.micro_batch_size):
            recs = records[start: start + self.micro_batch_size]
            resps = responses[start: start + self.micro_batch_size]
            prompts = [self.prompt_ids(r) for r in recs]
            layout = build_layout(prompts, resps, self.loaded.tokenizer.pad_token_id, device,
                                  share_prefix=self.cfg.share_prompt_prefix)
            extra = None
            if self.prompts.encoder is not None:
                from uniopd.models.multimodal import layout_inputs

                extra = layout_inputs(self.model, layout, [self.vision_inputs(r)[1] for r in recs],
                                      [len(p) for p in prompts])
            logp_N, hidden_NH = response_logprobs(self.model, layout, chunk_size=self.chunk_size,
                                                  return_hidden=want_hidden or want_topk, extra_inputs=extra,
                                                  suppress_ids=self.suppress_ids or None)
            logps.append(logp_N.float())
            if want_hidden:
                hiddens.append(hidden_NH)
            if want_topk:
                ids_NK, logp_NK = chunked_topk_logprobs(hidden_NH, self.output_head(), self.cfg.top_k,
                                                        chunk_size=self.chunk_size,
                                                        suppress_ids=self.suppress_ids or None)
                topk_ids.append(ids_NK)
                topk_logps.append(logp_NK)
        for _ in range(pad):
            base_model(self.model)(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)
        return TeacherScores(torch.cat(logps) if logps else torch.zeros(0),
                             hidden_NH=torch.cat(hiddens) if want_hidden and hiddens else None,
                             topk_ids_NK=torch.cat(topk_ids) if topk_ids else None,
                             topk_logp_NK=torch.cat(topk_logps) if topk_logps else None)
