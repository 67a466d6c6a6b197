"""Backends chosen by dotted path in YAML, written outside the package (tests/external_backends.py),
train end to end through the seams; a new loss kind is one function plus one registry call."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from external_backends import LogpOnlyScorer, PlainSampler

from uniopd.algo.losses.chunked import DENSE_LOSSES
from uniopd.algo.losses.dense import reverse_kl
from uniopd.algo.losses.registry import LOSS_KINDS, LossKind, register_loss
from uniopd.batch import HIDDEN, LOGP
from uniopd.config import load_config
from uniopd.data.records import PromptRecord
from uniopd.teachers.local import LocalTeacher
from uniopd.train.trainer import Trainer


def _recipe(tmp_path, student_dir, teacher_dir, data, **sections):
    tree = {"model": {"path": str(student_dir), "chat_template": False},
            "teachers": {"t": {"path": str(teacher_dir), "chat_template": False}},
            "data": {"train": str(data)},
            "rollout": {"prompts_per_step": 2, "n": 2, "max_new_tokens": 5},
            "trainer": {"steps": 2, "lr": 1e-3, "micro_batch_size": 4, "output_dir": str(tmp_path / "run")},
            "logging": {"progress": False, "tensorboard": False}}
    for section, values in sections.items():
        tree[section] = {**tree.get(section, {}), **values}
    tree["teachers"]["t"] = {**tree["teachers"]["t"], **sections.get("teacher", {})}
    tree.pop("teacher", None)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in open(run / "metrics.jsonl")]


def test_engine_and_logp_only_scorer_from_dotted_paths_train_with_default_diagnostics(
        tmp_path, tiny_student_dir, tiny_teacher_dir, arithmetic_file, caplog):
    PlainSampler.instances.clear()
    recipe = _recipe(tmp_path, tiny_student_dir, tiny_teacher_dir, arithmetic_file,
                     rollout={"backend": "external_backends:PlainSampler"},
                     teacher={"backend": "external_backends:LogpOnlyScorer"})
    cfg = load_config(recipe)
    assert cfg.logging.diagnostics and cfg.loss.kind == "sampled"
    with caplog.at_level("INFO"):
        trainer = Trainer(cfg)
    assert type(trainer.engine) is PlainSampler and type(trainer.teachers["t"]) is LogpOnlyScorer
    assert trainer.plan.want["t"] == {LOGP}
    # The unavailable diagnostics are reported once, at start-up.
    notes = [r.message for r in caplog.records if "returns no hidden states" in r.message]
    assert len(notes) == 1 and "teachers.t.backend='external_backends:LogpOnlyScorer'" in notes[0]
    result = trainer.train()
    rows = _metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2] and result["step"] == 2
    assert all("diag/topk_overlap" not in r and sum(v for k, v in r.items() if k.startswith("diag/logratio_hist/"))
               == r["update/tokens"] for r in rows)
    assert PlainSampler.instances[-1].synced == 2  # the engine heard of both optimizer steps
    assert all(torch.isfinite(p).all() for p in trainer.student.model.parameters())


def test_an_outside_scorer_returns_what_the_local_teacher_computes(tmp_path, tiny_student_dir, tiny_teacher_dir,
                                                                   arithmetic_file):
    recipe = _recipe(tmp_path, tiny_student_dir, tiny_teacher_dir, arithmetic_file,
                     teacher={"backend": "external_backends:LogpOnlyScorer"}, trainer={"steps": 1})
    trainer = Trainer(load_config(recipe))
    records = [PromptRecord(id="a", domain="d", prompt="1+2=", answer="3"),
               PromptRecord(id="b", domain="d", prompt="10+20=", answer="30")]
    responses = [[5, 6, 7], [8, 9]]
    outside = trainer.teachers["t"].score(records, responses).logp_N
    local = LocalTeacher(trainer.teachers["t"].name, trainer.cfg.teachers["t"], trainer.teachers["t"].loaded)
    inside = local.score(records, responses, want=frozenset({LOGP, HIDDEN}))
    torch.testing.assert_close(outside, inside.logp_N, atol=1e-5, rtol=0)
    assert inside.hidden_NH.shape[0] == 5


@pytest.mark.parametrize("backend", ["external_backends:TopKOnlyScorer", "local"])
def test_a_top_k_only_teacher_trains_a_teacher_side_top_k_loss(tmp_path, tiny_student_dir, tiny_teacher_dir,
                                                                arithmetic_file, backend):
    recipe = _recipe(tmp_path, tiny_student_dir, tiny_teacher_dir, arithmetic_file,
                     teacher={"backend": backend, "top_k": 8},
                     loss={"kind": "topk", "topk": 4, "topk_source": "teacher"})
    trainer = Trainer(load_config(recipe))
    assert trainer.plan.want["t"] == {"logp", "topk"}
    before = [p.detach().clone() for p in trainer.student.model.parameters()]
    trainer.train()
    rows = _metrics(tmp_path / "run")
    assert all(r["dense_loss"] > 0 for r in rows)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.student.model.parameters()))


def test_top_k_only_and_hidden_state_teachers_give_the_same_top_k_loss(tmp_path, tiny_student_dir, tiny_teacher_dir,
                                                                       arithmetic_file):
    """loss.kind=topk (teacher source) from the teacher's returned top-k equals the loss from its
    hidden states and head: same rollouts (same seed), same first-step loss."""
    losses = {}
    for top_k in (None, 6):
        run = tmp_path / f"k{top_k}"
        recipe = _recipe(run.parent, tiny_student_dir, tiny_teacher_dir, arithmetic_file,
                         teacher={"top_k": top_k}, loss={"kind": "topk", "topk": 6, "topk_source": "teacher"},
                         trainer={"steps": 1, "output_dir": str(run)}, logging={"diagnostics": False})
        Trainer(load_config(recipe)).train()
        losses[top_k] = _metrics(run)[0]["dense_loss"]
    assert losses[6] == pytest.approx(losses[None], abs=1e-6)


def test_a_new_loss_kind_is_one_function_and_one_registry_entry(tmp_path, tiny_student_dir, tiny_teacher_dir,
                                                                arithmetic_file):
    def half_reverse_kl(student_logits_BTV, teacher_logits_BTV, mask_BT, *, reduction="mean"):
        return 0.5 * reverse_kl(student_logits_BTV, teacher_logits_BTV, mask_BT, reduction=reduction)

    DENSE_LOSSES["half_reverse"] = half_reverse_kl
    register_loss(LossKind("half_reverse", "half the reverse KL", dense=lambda cfg: ("half_reverse", {}),
                           teacher_outputs=lambda cfg: (frozenset({LOGP, HIDDEN}),)))
    try:
        losses = {}
        for kind in ("full", "half_reverse"):
            run = tmp_path / kind
            recipe = _recipe(tmp_path, tiny_student_dir, tiny_teacher_dir, arithmetic_file, loss={"kind": kind},
                             trainer={"steps": 1, "output_dir": str(run)}, logging={"diagnostics": False})
            Trainer(load_config(recipe)).train()
            losses[kind] = _metrics(run)[0]["dense_loss"]
        assert losses["half_reverse"] == pytest.approx(0.5 * losses["full"], rel=1e-5)
    finally:
        DENSE_LOSSES.pop("half_reverse")
        LOSS_KINDS.pop("half_reverse")
