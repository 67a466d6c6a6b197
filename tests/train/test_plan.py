"""Start-up checks of backends against the loss and diagnostics: refused before any model loads."""

from __future__ import annotations

import pytest
from helpers import tiny_run_config

from uniopd.config import ConfigError
from uniopd.train.plan import plan_teachers
from uniopd.train.trainer import Trainer


def _cfg(tmp_path, **overrides):
    # Paths that do not exist: a check that ran after loading would fail on them instead.
    missing = tmp_path / "no_such_model"
    return tiny_run_config(missing, missing, tmp_path / "no_such_data.jsonl", tmp_path / "run", **overrides)


def test_a_dense_loss_with_a_logp_only_scorer_fails_before_any_model_loads_naming_both_keys(tmp_path):
    cfg = _cfg(tmp_path, **{"loss.kind": "full", "teachers.t.backend": "external_backends:LogpOnlyScorer"})
    with pytest.raises(ConfigError) as err:
        Trainer(cfg)
    msg = str(err.value)
    assert "loss.kind='full'" in msg and "teachers.t.backend='external_backends:LogpOnlyScorer'" in msg
    assert "hidden" in msg


def test_top_k_teachers_feed_only_teacher_side_top_k(tmp_path):
    with pytest.raises(ConfigError, match=r"loss.kind='topk'.*teachers.t.top_k=8.*loss.topk_source=teacher"):
        plan_teachers(_cfg(tmp_path, **{"loss.kind": "topk", "loss.topk_source": "union", "teachers.t.top_k": 8}))
    with pytest.raises(ConfigError, match=r"loss.topk=16 is more than the 8 tokens"):
        plan_teachers(_cfg(tmp_path, **{"loss.kind": "topk", "loss.topk": 16, "teachers.t.top_k": 8}))
    with pytest.raises(ConfigError, match=r"loss.temperature=2.0"):
        plan_teachers(_cfg(tmp_path, **{"loss.kind": "topk", "loss.topk": 4, "loss.temperature": 2.0,
                                        "teachers.t.top_k": 8}))
    plan = plan_teachers(_cfg(tmp_path, **{"loss.kind": "topk", "loss.topk": 4, "teachers.t.top_k": 8}))
    assert plan.want["t"] == {"logp", "topk"} and not plan.diagnostics["t"]


def test_hidden_states_are_asked_for_only_when_something_uses_them(tmp_path):
    assert plan_teachers(_cfg(tmp_path)).want["t"] == {"logp", "hidden"}  # diagnostics on by default
    assert plan_teachers(_cfg(tmp_path, **{"logging.diagnostics": False})).want["t"] == {"logp"}
    assert plan_teachers(_cfg(tmp_path, **{"loss.kind": "jsd", "logging.diagnostics": False})).want["t"] == {
        "logp", "hidden"}


@pytest.mark.parametrize("key, value, message", [
    ("rollout.backend", "vllm2", r"rollout.backend: 'vllm2' is not one of 'hf'.* and not a dotted path"),
    ("rollout.backend", "no_such_module_x:Engine", r"rollout.backend: cannot import 'no_such_module_x'"),
    ("rollout.backend", "external_backends:Missing", r"rollout.backend: module 'external_backends' has no attribute"),
    ("rollout.backend", "external_backends:LogpOnlyScorer", r"rollout.backend: .* is not a subclass of "
                                                           r"uniopd.rollout.base.RolloutEngine"),
    ("teachers.t.backend", "external_backends:NotAScorer", r"teachers.t.backend: .* is not a subclass of "
                                                          r"uniopd.teachers.base.TeacherScorer"),
    ("teachers.t.backend", "grpc", r"teachers.t.backend: 'grpc' is not one of 'local', 'remote', 'cache'"),
])
def test_unknown_backends_fail_naming_the_key(tmp_path, key, value, message):
    with pytest.raises(ConfigError, match=message):
        Trainer(_cfg(tmp_path, **{key: value}))


def test_an_engine_without_data_parallel_support_is_refused_under_data_parallel(tmp_path, capsys):
    engine = "external_backends:OneProcessSampler"
    with pytest.raises(ConfigError, match=rf"rollout.backend='{engine}' with trainer.strategy=data_parallel .*"
                                          r"not supported"):
        plan_teachers(_cfg(tmp_path, **{"rollout.backend": engine, "trainer.strategy": "data_parallel"}))
    # `uniopd train --nproc 2` refuses it once, before torchrun starts any process.
    from uniopd.cli import main

    args = [f"{k}={v}" for k, v in {"model.path": tmp_path / "m", "teachers.t.path": tmp_path / "t",
                                     "data.train": tmp_path / "d.jsonl", "rollout.backend": engine}.items()]
    assert main(["train", "--nproc", "2", *args]) == 2
    assert f"rollout.backend='{engine}' with trainer.strategy=data_parallel" in capsys.readouterr().err
