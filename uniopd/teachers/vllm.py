"""An in-process vLLM teacher (`teachers.<name>.backend: vllm`, extra `uniopd[vllm]`).

For single-node runs where the teacher needs no server of its own: a vLLM engine in this
process scores each (teacher view + student response) with `prompt_logprobs`, which returns
log πT(y_t | view, y<t) for every token of the sequence (temperature 1, the full vocabulary
of the engine's head) and, with `teachers.<name>.top_k` set, the teacher's top-k ids and
log-probs per position. Returns {logp} or {logp, topk}; no hidden states, so dense losses
refuse it at start-up (`uniopd.train.plan`) and `loss.kind=topk` with `topk_source: teacher`
trains from its top-k.

The view is rendered client-side by `TeacherPrompts`, exactly as the local teacher and the
teacher-server clients render it, and handed to vLLM as token ids (`skip_tokenizer_init`).
A GGUF teacher, a self-distilled copy of the student and a model given in code are written
to a temporary Hugging Face directory first. Where the teacher's head is padded past its
tokenizer the padded rows keep their (tiny) share of the normaliser: vLLM scores over the
whole head, the local teacher over the tokenizer's tokens (a warning says so once).
"""

from __future__ import annotations

import logging
import shutil
import types
from pathlib import Path

import torch

from uniopd.config import ConfigError, TeacherConfig
from uniopd.data.records import PromptRecord
from uniopd.models.loading import check_vocabularies, load_model, load_tokenizer, split_model_path
from uniopd.rollout.vllm import DEFAULT_MEMORY_UTILIZATION, export_hf_dir, start_llm, vllm_missing
from uniopd.teachers.base import LOGP, TOPK, ScorerContext, TeacherScorer, TeacherScores
from uniopd.teachers.views import TeacherPrompts

log = logging.getLogger(__name__)


class VLLMTeacher(TeacherScorer):
    def __init__(self, name: str, cfg: TeacherConfig, llm, tokenizer, *, model_dir: Path | None = None):
        super().__init__(name, cfg)
        self.llm, self.tokenizer = llm, tokenizer
        self._dir = model_dir  # a temporary export, removed on close
        self.prompts = TeacherPrompts(cfg, tokenizer)

    @classmethod
    def outputs(cls, cfg: TeacherConfig) -> frozenset[str]:
        return frozenset({LOGP, TOPK}) if cfg.top_k else frozenset({LOGP})

    @classmethod
    def check_config(cls, cfg: TeacherConfig, key: str) -> None:
        super().check_config(cfg, key)
        missing = vllm_missing(f"{key}.backend")
        if missing:
            raise ConfigError(missing)

    @classmethod
    def from_config(cls, name: str, cfg: TeacherConfig, ctx: ScorerContext) -> "VLLMTeacher":
        key = f"teachers.{name}"
        cls.check_config(cfg, key)
        if ctx.suppress_ids:
            raise ConfigError(f"{key}.backend=vllm cannot restrict the teacher to a vision-language student's "
                              f"non-image tokens; use {key}.backend=local")
        export = None
        if ctx.preloaded is not None or cfg.self_distill:
            loaded = ctx.preloaded or ctx.student
            model, tokenizer, source = loaded.model, loaded.tokenizer, loaded.source
        else:
            tokenizer, source = load_tokenizer(cfg, key), cfg.path
            model = None
            if split_model_path(cfg)[1]:  # GGUF: transformers dequantises it, vLLM reads the export
                model = load_model(cfg, key, device="cpu", trainable=False).model
        check_vocabularies(ctx.student, types.SimpleNamespace(tokenizer=tokenizer, source=source), name)
        if model is not None:
            if getattr(model, "config", None) is not None and getattr(model.config, "vision_config", None):
                raise ConfigError(f"{key}.backend=vllm scores text only; use {key}.backend=local for a "
                                  f"vision-language teacher")
            export = export_hf_dir(model, f"uniopd-vllm-teacher-{name}-")
            dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
            model_dir = str(export)
        else:
            dtype, model_dir = cfg.dtype, split_model_path(cfg)[0]
        kwargs = dict(dtype=dtype, gpu_memory_utilization=DEFAULT_MEMORY_UTILIZATION,
                      max_logprobs=max(cfg.top_k or 0, 20), trust_remote_code=cfg.trust_remote_code)
        if cfg.revision and export is None:
            kwargs["revision"] = cfg.revision
        try:
            llm = start_llm(model_dir, f"{key}.backend", source, **kwargs)
        except BaseException:
            if export is not None:
                shutil.rmtree(export, ignore_errors=True)
            raise
        head = llm.llm_engine.model_config.get_vocab_size()
        if head > len(tokenizer):
            log.warning("%s.backend=vllm: the head has %d rows for a %d-token tokenizer; the padded rows stay in "
                        "the normaliser (the local teacher leaves them out)", key, head, len(tokenizer))
        return cls(name, cfg, llm, tokenizer, model_dir=export)

    @torch.inference_mode()
    def score(self, records: list[PromptRecord], responses: list[list[int]], *,
              want: frozenset[str] = frozenset({LOGP})) -> TeacherScores:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.check_want(want)
        want_topk = TOPK in want
        k = self.cfg.top_k if want_topk else 0
        prompts = [self.prompts.ids(r) for r in records]
        # One token is generated and discarded: vLLM computes prompt log-probs on the way there.
        params = SamplingParams(max_tokens=1, prompt_logprobs=k, temperature=1.0, detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p + list(r)) for p, r in zip(prompts, responses)],
                                 params, use_tqdm=False)
        logps, ids, tops = [], [], []
        for prompt, response, out in zip(prompts, responses, outs):
            # prompt_logprobs[j] scores token j given tokens < j (entry 0 is None).
            steps = out.prompt_logprobs[len(prompt): len(prompt) + len(response)]
            logps.extend(step[t].logprob for t, step in zip(response, steps))
            if want_topk:
                for step in steps:
                    best = sorted(((lp.rank, t, lp.logprob) for t, lp in step.items() if lp.rank <= k))[:k]
                    ids.append([t for _, t, _ in best])
                    tops.append([v for _, _, v in best])
        return TeacherScores(torch.tensor(logps, dtype=torch.float32),
                             topk_ids_NK=torch.tensor(ids, dtype=torch.long).view(-1, k) if want_topk else None,
                             topk_logp_NK=torch.tensor(tops, dtype=torch.float32).view(-1, k) if want_topk else None)

    def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception as exc:  # still remove the export
                log.debug("vllm teacher: shutdown failed: %s", exc)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
