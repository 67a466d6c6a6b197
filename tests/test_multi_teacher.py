"""Several teachers routed by domain: each row scored by its own teacher, metrics per teacher."""

import pytest
import torch

from helpers import make_tiny_model, write_jsonl
from uniopd.config import ConfigError
from uniopd.train.trainer import Trainer


@pytest.fixture
def two_domain_file(tmp_path):
    rows = [{"id": f"{d}{i}", "domain": d, "prompt": f"{i}{'+' if d == 'add' else '-'}{i}=",
             "answer": str(2 * i if d == "add" else 0)} for d in ("add", "sub") for i in range(4)]
    return write_jsonl(tmp_path / "two.jsonl", rows)


def _config(student, t_add, t_sub, data, out):
    from uniopd.config import load_config

    return load_config(None, [f"model.path={student}", f"teachers.adder.path={t_add}", "teachers.adder.domains=[add]",
                              f"teachers.subber.path={t_sub}", "teachers.subber.domains=[sub]",
                              f"data.train={data}", f"trainer.output_dir={out}", "rollout.prompts_per_step=8",
                              "rollout.n=2", "rollout.max_new_tokens=4", "trainer.steps=1",
                              "logging.progress=false", "logging.tensorboard=false"])


def test_mixed_batches_are_scored_by_the_routed_teacher(tiny_student_dir, tiny_teacher_dir, two_domain_file,
                                                        tmp_path):
    other = make_tiny_model(tmp_path / "other_teacher", hidden=32, seed=7)
    cfg = _config(tiny_student_dir, tiny_teacher_dir, other, two_domain_file, tmp_path / "run")
    trainer = Trainer(cfg)
    batch, _ = trainer.collect(trainer.sampler.next(8))
    trainer.score(batch)
    assert {r.domain for r in batch.records} == {"add", "sub"}
    assert batch.teacher_names == ["adder" if r.domain == "add" else "subber" for r in batch.records]
    for name in ("adder", "subber"):
        rows = [b for b, t in enumerate(batch.teacher_names) if t == name]
        direct = trainer.teachers[name].score([batch.records[b] for b in rows],
                                              [batch.samples[b].response_ids for b in rows]).logp_N
        got = torch.cat([batch.teacher_logp_BT[b, : len(batch.samples[b].response_ids)] for b in rows])
        assert torch.allclose(got, direct, atol=1e-6)
    # the two teachers really differ, so routing to the wrong one would be visible
    rows = [b for b, t in enumerate(batch.teacher_names) if t == "adder"]
    wrong = trainer.teachers["subber"].score([batch.records[b] for b in rows],
                                             [batch.samples[b].response_ids for b in rows]).logp_N
    assert not torch.allclose(wrong, torch.cat([batch.teacher_logp_BT[b, : len(batch.samples[b].response_ids)]
                                                for b in rows]))
    metrics, _ = trainer.step()
    for key in ("teacher/adder/teacher_kl", "teacher/subber/teacher_kl", "domain/add/acc", "domain/sub/acc"):
        assert key in metrics


def test_a_domain_without_teacher_fails_before_any_model_loads(tmp_path, two_domain_file):
    from uniopd.config import load_config

    cfg = load_config(None, ["model.path=/does/not/exist", "teachers.adder.path=/nope", "teachers.adder.domains=[add]",
                             f"data.train={two_domain_file}", f"trainer.output_dir={tmp_path / 'r'}"])
    with pytest.raises(ConfigError, match="no teacher claims domain 'sub'"):
        Trainer(cfg)


def test_token_diagnostics_are_logged_per_domain_and_overall(tiny_student_dir, tiny_teacher_dir, two_domain_file,
                                                             tmp_path):
    other = make_tiny_model(tmp_path / "other_teacher", hidden=32, seed=7)
    cfg = _config(tiny_student_dir, tiny_teacher_dir, other, two_domain_file, tmp_path / "run")
    cfg.logging.diagnostics = True
    metrics, _ = Trainer(cfg).step()
    per_domain = {d: metrics[f"domain/{d}/topk_overlap"] for d in ("add", "sub")}
    assert all(0.0 <= v <= 1.0 for v in per_domain.values())
    for key in ("reverse_kl", "shared_mass_student", "entropy_gap"):
        assert {f"domain/add/{key}", f"domain/sub/{key}"} <= metrics.keys()
    # The overall value is the token-weighted mean of the per-domain values, so it lies between them.
    assert min(per_domain.values()) - 1e-6 <= metrics["diag/topk_overlap"] <= max(per_domain.values()) + 1e-6
    # Each domain is measured against its own teacher: the two teachers differ, so do the KLs.
    assert metrics["domain/add/reverse_kl"] != metrics["domain/sub/reverse_kl"]
