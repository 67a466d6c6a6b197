"""Backends written outside the package, chosen by dotted path in a config
(`rollout.backend: external_backends:PlainSampler`), as a user's own would be.

They are deliberately plain: full forwards without a KV cache, torch.multinomial, no fast
paths, so they check that the seams carry everything a backend needs and nothing more.
"""

from __future__ import annotations

import torch

from uniopd.batch import LOGP, TOPK, Sample
from uniopd.config import TeacherConfig
from uniopd.rewards.base import Outcome, register_verifier
from uniopd.models.loading import load_model
from uniopd.models.prompts import render_prompt
from uniopd.rollout.base import EngineSupport, RolloutEngine
from uniopd.teachers.base import TeacherScorer, TeacherScores


class PlainSampler(RolloutEngine):
    """Samples token by token with a full forward per token; counts weight syncs."""

    support = EngineSupport(images=False, weight_sync="shared")
    instances: list["PlainSampler"] = []

    def __init__(self, cfg, student, *, suppress_ids=None):
        super().__init__(cfg, student, suppress_ids=suppress_ids)
        self.synced = 0
        PlainSampler.instances.append(self)

    @torch.no_grad()
    def sample(self, prompts, n, *, multimodal=None, greedy=False, generator=None):
        model, eos = self.student.model, self.student.tokenizer.eos_token_id
        was_training = model.training
        model.eval()
        groups = []
        for prompt in prompts:
            group = []
            for _ in range(n):
                ids, logps = list(prompt), []
                for _ in range(self.cfg.max_new_tokens):
                    logits_V = model(input_ids=torch.tensor([ids])).logits[0, -1].float() / self.cfg.temperature
                    logp_V = torch.log_softmax(logits_V, -1)
                    tok = int(logp_V.argmax()) if greedy else int(torch.multinomial(logp_V.exp(), 1,
                                                                                    generator=generator))
                    ids.append(tok)
                    logps.append(float(logp_V[tok]))
                    if tok == eos:
                        break
                group.append(Sample(list(prompt), ids[len(prompt):], logps, ids[-1] == eos))
            groups.append(group)
        model.train(was_training)
        return groups

    def update_weights(self, model):
        self.synced += 1


class _PlainScorer(TeacherScorer):
    """A teacher model scored with one full forward per response."""

    def __init__(self, name, cfg, loaded):
        super().__init__(name, cfg)
        self.loaded = loaded

    @classmethod
    def from_config(cls, name, cfg: TeacherConfig, ctx):
        return cls(name, cfg, load_model(cfg, f"teachers.{name}", device=ctx.device, trainable=False))

    @torch.no_grad()
    def _logp_rows(self, records, responses):
        tok = self.loaded.tokenizer
        for record, response in zip(records, responses):
            prompt = render_prompt(tok, record.prompt, chat_template=self.cfg.chat_template)
            logits = self.loaded.model(input_ids=torch.tensor([prompt + response])).logits[0].float()
            yield torch.log_softmax(logits[len(prompt) - 1: len(prompt) - 1 + len(response)], -1), response


class LogpOnlyScorer(_PlainScorer):
    """Returns only the sampled tokens' log-probs, as an inference server does."""

    @classmethod
    def outputs(cls, cfg):
        return frozenset({LOGP})

    def score(self, records, responses, *, want=frozenset({LOGP})):
        rows = [logp_TV.gather(-1, torch.tensor(resp)[:, None]).squeeze(-1)
                for logp_TV, resp in self._logp_rows(records, responses)]
        return TeacherScores(torch.cat(rows) if rows else torch.zeros(0))


class TopKOnlyScorer(_PlainScorer):
    """Returns the sampled tokens' log-probs and the teacher's top-k (teachers.<name>.top_k)."""

    @classmethod
    def outputs(cls, cfg):
        return frozenset({LOGP, TOPK})

    def score(self, records, responses, *, want=frozenset({LOGP})):
        logps, ids, tops = [], [], []
        for logp_TV, resp in self._logp_rows(records, responses):
            logps.append(logp_TV.gather(-1, torch.tensor(resp)[:, None]).squeeze(-1))
            top = logp_TV.topk(self.cfg.top_k, -1)
            ids.append(top.indices)
            tops.append(top.values)
        return TeacherScores(torch.cat(logps), topk_ids_NK=torch.cat(ids) if TOPK in want else None,
                             topk_logp_NK=torch.cat(tops) if TOPK in want else None)


class OneProcessSampler(PlainSampler):
    """An engine that declares it cannot run one copy per process (`EngineSupport.data_parallel`)."""

    support = EngineSupport(images=False, weight_sync="shared", data_parallel=False)


class NotAScorer:
    """Not a TeacherScorer: choosing it must fail naming the key."""


class SeededSampler(PlainSampler):
    """Each response depends only on its prompt's token ids and its index in the group (the
    tokens are drawn from a generator seeded by them), and its log-probs come from a full
    forward of that one sequence: the same rollouts however prompts are split across
    processes or batched, so data-parallel runs can be compared with one process."""

    @torch.no_grad()
    def sample(self, prompts, n, *, multimodal=None, greedy=False, generator=None):
        model, eos = self.student.model, self.student.tokenizer.eos_token_id
        vocab = self.student.vocab_size
        was_training = model.training
        model.eval()
        groups = []
        for prompt in prompts:
            group = []
            for j in range(n):
                g = torch.Generator().manual_seed(hash((tuple(prompt), j)) % (2**31))
                length = int(torch.randint(1, self.cfg.max_new_tokens + 1, (1,), generator=g))
                response = torch.randint(3, vocab, (length,), generator=g).tolist()
                logits = model(input_ids=torch.tensor([list(prompt) + response])).logits[0].float()
                logp_TV = torch.log_softmax(logits[len(prompt) - 1: -1] / self.cfg.temperature, -1)
                logps = logp_TV.gather(-1, torch.tensor(response)[:, None]).squeeze(-1).tolist()
                group.append(Sample(list(prompt), response, logps, response[-1] == eos))
            groups.append(group)
        model.train(was_training)
        return groups


@register_verifier("even_length")
def even_length(response: str, record) -> Outcome:
    """Correct when the response text has an even length: both outcomes in most groups of
    random responses, the same verdict in every process."""
    return Outcome(len(response) % 2 == 0, float(len(response) % 2 == 0), "pass" if len(response) % 2 == 0 else "fail")
