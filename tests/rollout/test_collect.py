"""The training step's collection: online balancing's redraw rounds with an engine that spans
several processes (`RolloutEngine.collective`) keep calling it, so its processes stay in step."""

from __future__ import annotations

import pytest
import torch

from uniopd.batch import Sample
from uniopd.config import BalanceConfig, RolloutConfig
from uniopd.data.records import PromptRecord
from uniopd.demo.tokenizer import char_tokenizer
from uniopd.rollout.base import RolloutEngine
from uniopd.rollout.collect import ResponseVerifier, collect_step


class MixedEngine(RolloutEngine):
    """One right ("1") and one wrong ("7") answer per group, so no group is uniform and
    balancing has nothing to redraw; records every call's prompts."""

    def __init__(self, tok, collective: bool):
        super().__init__(RolloutConfig(), student=None)
        self.tok, self.collective, self.calls = tok, collective, []

    def sample(self, prompts, n, *, multimodal=None, greedy=False, generator=None):
        self.calls.append([list(p) for p in prompts])
        return [[Sample(list(p), self.tok.encode(a, add_special_tokens=False), [-1.0], False) for a in ("1", "7")]
                for p in prompts]


@pytest.mark.parametrize("collective,calls", [(False, 1), (True, 4)])
def test_a_collective_engine_is_called_every_round_even_with_nothing_to_redraw(collective, calls):
    tok = char_tokenizer()
    engine = MixedEngine(tok, collective)
    records = [PromptRecord(id="r0", domain="d", prompt="x", answer="1", verifier="exact")]
    balance = BalanceConfig(online=True, mode="select", oversample=1.0, max_resample=3)
    batch, metrics = collect_step(engine, records, [[0]], n=2, balance=balance, verifier=ResponseVerifier(tok),
                                  generator=torch.Generator())
    assert len(engine.calls) == calls
    assert engine.calls[1:] == [[]] * (calls - 1)  # the extra rounds ask for nothing
    assert metrics["balance/resampled_groups"] == 0.0
    assert batch.correct_B.tolist() == [True, False]

