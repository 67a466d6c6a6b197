"""Old log-probs from an engine that is not the trainer (vLLM) are recomputed by the trainer;
the hf engine's are kept as they are (its log-probs are the trainer's computation)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_run_config

from uniopd.batch import Sample, StepBatch, response_mask
from uniopd.config import RolloutConfig
from uniopd.rollout.base import EngineSupport
from uniopd.rollout.hf import HFEngine
from uniopd.train.old_logprobs import replace_engine_logprobs
from uniopd.train.trainer import Trainer

SHIFT = 0.01


def _batch(engine_rows):
    samples = [Sample([1], [3] * len(r), r, True) for r in engine_rows]
    T = max(len(r) for r in engine_rows)
    old = torch.tensor([r + [0.0] * (T - len(r)) for r in engine_rows])
    return StepBatch(records=[None] * len(samples), samples=samples, group_ids_B=torch.zeros(len(samples)),
                     mask_BT=response_mask(samples), old_logp_BT=old, correct_B=torch.zeros(len(samples)),
                     score_B=torch.zeros(len(samples)))


def test_replace_engine_logprobs_by_hand():
    batch = _batch([[-1.0, -2.0], [-0.5]])
    trainer_BT = torch.tensor([[-1.1, -1.0], [-0.5, 0.0]])
    metrics = replace_engine_logprobs(batch, trainer_BT, RolloutConfig(old_logprobs="engine", tis_cap=2.0))
    assert metrics["rollout/logprob_diff_max"] == pytest.approx(1.0)
    assert metrics["rollout/logprob_diff_mean"] == pytest.approx((0.1 + 1.0 + 0.0) / 3)
    assert torch.equal(batch.old_logp_BT, trainer_BT)
    # min(exp(trainer - engine), cap), 0 past each response's end
    expected = torch.tensor([[math.exp(-0.1), 2.0], [1.0, 0.0]])
    torch.testing.assert_close(batch.is_weight_BT, expected)
    assert metrics["rollout/tis_capped_frac"] == pytest.approx(1 / 3)
    plain = _batch([[-1.0, -2.0], [-0.5]])
    replace_engine_logprobs(plain, trainer_BT, RolloutConfig())
    assert plain.is_weight_BT is None


class TwoProcesses:
    """The reductions of a 2-process strategy, the other process holding `other` (its sums, its max)."""

    def __init__(self, other_sums, other_max):
        self.other_sums, self.other_max = other_sums, other_max

    def reduce_sums(self, sums):
        return {k: v + self.other_sums[k] for k, v in sums.items()}

    def reduce_max(self, value):
        return max(value, self.other_max)


def test_the_mismatch_is_over_every_process_rows():
    batch = _batch([[-1.0, -2.0], [-0.5]])  # |diff| 0.1, 1.0, 0.0 here
    trainer_BT = torch.tensor([[-1.1, -1.0], [-0.5, 0.0]])
    # The other process: 5 tokens, |diff| summing to 0.4, largest 2.5; 1 token at the cap.
    other = {"n": 5.0, "diff": 0.4, "tis": 4.0, "capped": 1.0}
    metrics = replace_engine_logprobs(batch, trainer_BT, RolloutConfig(old_logprobs="engine", tis_cap=2.0),
                                      TwoProcesses(other, 2.5))
    assert metrics["rollout/logprob_diff_max"] == pytest.approx(2.5)
    assert metrics["rollout/logprob_diff_mean"] == pytest.approx((1.1 + 0.4) / 8)
    assert metrics["rollout/tis_weight_mean"] == pytest.approx((math.exp(-0.1) + 2.0 + 1.0 + 4.0) / 8)
    assert metrics["rollout/tis_capped_frac"] == pytest.approx((1 + 1) / 8)


class ShiftedEngine(HFEngine):
    """The hf loop reporting log-probs off by SHIFT, as another engine's kernels would be."""

    support = EngineSupport(images=True, weight_sync="shared", trainer_logprobs=False)

    def sample(self, prompts, n, **kw):
        groups = super().sample(prompts, n, **kw)
        for g in groups:
            for s in g:
                s.logprobs = [lp - SHIFT for lp in s.logprobs]
        return groups


@pytest.mark.parametrize("mode", ["trainer", "engine"])
def test_an_engine_whose_logprobs_differ_gets_them_recomputed(tmp_path, tiny_student_dir, tiny_teacher_dir,
                                                             arithmetic_file, mode):
    cfg = tiny_run_config(tiny_student_dir, tiny_teacher_dir, arithmetic_file, tmp_path / "run",
                          **{"rollout.old_logprobs": mode, "trainer.steps": 1})
    trainer = Trainer(cfg)
    trainer.engine = ShiftedEngine(cfg.rollout, trainer.student)
    metrics, _ = trainer.step()
    assert metrics["rollout/logprob_diff_mean"] == pytest.approx(SHIFT, abs=1e-4)
    assert metrics["rollout/logprob_diff_max"] == pytest.approx(SHIFT, abs=1e-4)
    assert "time/old_logprobs" in metrics
    # The PPO ratio starts at 1: old log-probs are the trainer's own.
    assert metrics["approx_kl"] == pytest.approx(0.0, abs=1e-7) and metrics["clip_frac"] == 0.0
    if mode == "engine":
        assert metrics["rollout/tis_weight_mean"] == pytest.approx(math.exp(SHIFT), abs=1e-4)
    else:
        assert "rollout/tis_weight_mean" not in metrics


def test_the_hf_engine_is_not_recomputed(tmp_path, tiny_student_dir, tiny_teacher_dir, arithmetic_file):
    cfg = tiny_run_config(tiny_student_dir, tiny_teacher_dir, arithmetic_file, tmp_path / "run", **{"trainer.steps": 1})
    trainer = Trainer(cfg)
    metrics, _ = trainer.step()
    assert not any(k.startswith("rollout/") for k in metrics) and "time/old_logprobs" not in metrics
