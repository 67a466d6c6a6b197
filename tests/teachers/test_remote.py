"""A teacher behind `uniopd serve-teacher` on loopback: the same scores and the same training as the
in-process teacher, and the failure policy (no row is ever trained on a wrong signal) when the
server hangs, dies, comes back, or answers garbage."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from helpers import tiny_run_config
from teacher_servers import ServeTeacher, SpoilingProxy, free_port

from uniopd.config import ConfigError, TeacherConfig
from uniopd.data.records import PromptRecord
from uniopd.models.loading import load_model, load_tokenizer
from uniopd.teachers.local import LocalTeacher
from uniopd.teachers.remote import RemoteTeacher, TeacherServiceError
from uniopd.train.token_advantages import token_advantages
from uniopd.train.trainer import TeacherUnavailable, Trainer


@pytest.fixture(scope="module")
def server(tiny_teacher_dir):
    s = ServeTeacher(tiny_teacher_dir).start()
    yield s
    s.kill()


def _config(tmp_path, student, teacher, data, url=None, api="uniopd", **overrides):
    remote = {}
    if url:
        remote = {"teachers.t.backend": "remote", "teachers.t.urls": f"[{url}]", "teachers.t.api": api,
                  "teachers.t.timeout_s": 60, "teachers.t.retries": 1, "teachers.t.backoff_s": 0.05}
    return tiny_run_config(student, teacher, data, tmp_path / "run", **{"logging.diagnostics": "false",
                                                                         **remote, **overrides})


def _losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in open(run_dir / "metrics.jsonl")]


RECORDS = [PromptRecord(id=f"r{i}", domain="d", prompt=f"{i}+{i}=", answer="1") for i in range(5)]
RESPONSES = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [], [6, 6, 6, 6, 6, 6]]


@pytest.mark.parametrize("api", ["vllm", "uniopd"])
def test_served_scores_equal_in_process_scores(server, tiny_teacher_dir, api):
    cfg = TeacherConfig(path=str(tiny_teacher_dir), backend="remote", urls=[server.url], api=api, top_k=4,
                        request_batch=2)
    remote = RemoteTeacher("t", cfg, load_tokenizer(cfg))
    local = LocalTeacher("t", TeacherConfig(path=str(tiny_teacher_dir), top_k=4),
                         load_model(cfg, trainable=False))
    want = frozenset({"logp", "topk"})
    got, expected = remote.score(RECORDS, RESPONSES, want=want), local.score(RECORDS, RESPONSES, want=want)
    remote.close()
    assert got.ok_S is None
    torch.testing.assert_close(got.logp_N, expected.logp_N, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.topk_logp_NK, expected.topk_logp_NK, atol=1e-5, rtol=0)
    assert torch.equal(got.topk_ids_NK, expected.topk_ids_NK)


@pytest.mark.parametrize("api", ["uniopd", "vllm"])
def test_training_against_the_server_gives_the_in_process_losses(server, tmp_path, tiny_student_dir,
                                                                 tiny_teacher_dir, arithmetic_file, api):
    steps = {"trainer.steps": 3}
    local = _config(tmp_path / "local", tiny_student_dir, tiny_teacher_dir, arithmetic_file, **steps)
    Trainer(local).train()
    served = _config(tmp_path / "served", tiny_student_dir, tiny_teacher_dir, arithmetic_file, url=server.url,
                     api=api, **steps)
    trainer = Trainer(served)
    trainer.train()
    trainer.teachers["t"].close()
    a, b = _losses(tmp_path / "local" / "run"), _losses(tmp_path / "served" / "run")
    assert len(a) == len(b) == 3
    assert a == pytest.approx(b, abs=1e-5, rel=0)
    row = json.loads(open(tmp_path / "served" / "run" / "metrics.jsonl").readline())
    assert row["teacher/t/failed_rows"] == 0 and row["teacher/t/tokens_per_s"] > 0 and row["teacher/t/latency_s"] > 0


def _scored_step(trainer):
    batch, _ = trainer.collect(trainer.sampler.next(trainer.cfg.rollout.prompts_per_step))
    trainer.score(batch)
    token_advantages(batch, trainer.cfg.loss, trainer.cfg.calibration)
    return batch


@pytest.mark.parametrize("mode", ["nan", "truncated", "oov"])
def test_garbage_answers_leave_exactly_those_rows_without_signal(server, tmp_path, tiny_student_dir,
                                                                 tiny_teacher_dir, arithmetic_file, mode):
    proxy = SpoilingProxy(server.url, mode, spoil=lambda ids: sum(ids) % 2 == 0)
    overrides = {"teachers.t.max_failed_share": 1.0, "rollout.prompts_per_step": 6}
    if mode == "oov":
        overrides.update({"teachers.t.top_k": 3, "loss.kind": "topk", "loss.topk": 3})
    cfg = _config(tmp_path, tiny_student_dir, tiny_teacher_dir, arithmetic_file, url=proxy.url, api="vllm",
                  **overrides)
    trainer = Trainer(cfg)
    local = LocalTeacher("t", cfg.teachers["t"], load_model(cfg.teachers["t"], trainable=False))
    try:
        batch = _scored_step(trainer)
    finally:
        trainer.teachers["t"].close()
        proxy.close()
    spoiled = set(proxy.spoiled)
    assert spoiled and batch.teacher_ok_B is not None
    for b, sample in enumerate(batch.samples):
        seq = tuple(trainer.teachers["t"].prompts.ids(batch.records[b]) + sample.response_ids)
        if not sample.response_ids:
            continue
        if seq in spoiled:
            assert not batch.teacher_ok_B[b]
            assert not batch.mask_BT[b].any() and not batch.adv_BT[b].any()
            assert b not in batch.teacher_topk
        else:
            assert batch.teacher_ok_B[b]
            expected = local.score([batch.records[b]], [sample.response_ids]).logp_N
            torch.testing.assert_close(batch.teacher_logp_BT[b, : len(expected)], expected, atol=1e-5, rtol=0)


def test_a_hanging_server_times_out_and_the_run_stops_with_its_checkpoint_intact(
        server, tmp_path, tiny_student_dir, tiny_teacher_dir, arithmetic_file):
    proxy = SpoilingProxy(server.url, "ok", hang_s=3.0)
    cfg = _config(tmp_path, tiny_student_dir, tiny_teacher_dir, arithmetic_file, url=proxy.url, api="vllm",
                  **{"trainer.steps": 1, "trainer.save_every": 1})
    trainer = Trainer(cfg)
    trainer.train()
    proxy.mode = "hang"
    trainer.teachers["t"].timeout_s = 0.3  # what teachers.t.timeout_s=0.3 sets; the first step had time
    trainer.cfg.trainer.steps = 2
    with pytest.raises(TeacherUnavailable, match=r"teacher 't' gave no usable signal for 8 of its 8 rows .*"
                                                 r"max_failed_share=0.5.*ReadTimeout"):
        trainer.train()
    trainer.teachers["t"].close()
    proxy.close()
    found = trainer.strategy.load_latest(tmp_path / "run", trainer.student.model)
    assert found is not None and found[1]["step"] == 1


def test_rows_without_signal_do_not_move_the_weights(server, tmp_path, tiny_student_dir, tiny_teacher_dir,
                                                     arithmetic_file):
    proxy = SpoilingProxy(server.url, "down")
    cfg = _config(tmp_path, tiny_student_dir, tiny_teacher_dir, arithmetic_file, url=proxy.url, api="vllm",
                  **{"teachers.t.max_failed_share": 1.0, "trainer.steps": 1})
    proxy.mode = "ok"
    trainer = Trainer(cfg)
    proxy.mode = "down"  # HTTP 500 from here on
    before = [p.detach().clone() for p in trainer.student.model.parameters()]
    trainer.train()
    trainer.teachers["t"].close()
    proxy.close()
    row = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
    assert row["teacher/t/failed_rows"] == 8 and row["update/rows"] == 0 and row["teacher/t/retries"] > 0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.student.model.parameters()))


def test_a_killed_server_stops_the_run_and_a_restarted_one_is_used_again(tmp_path, tiny_student_dir,
                                                                          tiny_teacher_dir, arithmetic_file):
    own = ServeTeacher(tiny_teacher_dir).start()
    try:
        cfg = _config(tmp_path, tiny_student_dir, tiny_teacher_dir, arithmetic_file, url=own.url, api="uniopd",
                      **{"trainer.steps": 1, "trainer.save_every": 1})
        trainer = Trainer(cfg)
        trainer.train()
        own.kill()
        trainer.cfg.trainer.steps = 2
        with pytest.raises(TeacherUnavailable, match="ConnectError"):
            trainer.train()
        # Restarted while a step waits on it: the retries (backoff doubling to 2 s) outlast the start-up.
        teacher = trainer.teachers["t"]
        teacher.retries, teacher.backoff_s = 12, 0.25
        restart = threading.Thread(target=own.start, kwargs={"wait": False})
        restart.start()
        batch = _scored_step(trainer)
        restart.join()
        assert batch.teacher_ok_B is None and batch.mask_BT.any()
        teacher.close()
    finally:
        own.kill()


def test_another_tokenizer_on_the_server_is_refused_at_start_up(server, tmp_path, tiny_student_dir,
                                                                 tiny_teacher_dir, arithmetic_file):
    proxy = SpoilingProxy(server.url, "tokenizer")
    cfg = _config(tmp_path, tiny_student_dir, tiny_teacher_dir, arithmetic_file, url=proxy.url, api="vllm")
    with pytest.raises(TeacherServiceError, match="tokenises differently .* first difference at position 1"):
        Trainer(cfg)
    proxy.close()


def test_no_server_at_start_up_is_refused(tmp_path, tiny_student_dir, tiny_teacher_dir, arithmetic_file):
    cfg = _config(tmp_path, tiny_student_dir, tiny_teacher_dir, arithmetic_file,
                  url=f"http://127.0.0.1:{free_port()}", **{"teachers.t.retries": 0})
    with pytest.raises(TeacherServiceError, match="no server answered at start-up"):
        Trainer(cfg)


def test_backend_keys_are_refused_where_they_are_not_read(tmp_path, tiny_student_dir, tiny_teacher_dir,
                                                          arithmetic_file):
    cfg = _config(tmp_path, tiny_student_dir, tiny_teacher_dir, arithmetic_file, **{"teachers.t.timeout_s": 3})
    with pytest.raises(ConfigError, match=r"teachers.t.timeout_s=3.0 is read by teachers.t.backend=remote only"):
        Trainer(cfg)
    cfg = _config(tmp_path, tiny_student_dir, tiny_teacher_dir, arithmetic_file,
                  **{"teachers.t.backend": "remote"})
    with pytest.raises(ConfigError, match="teachers.t.urls: a remote teacher needs one or more server URLs"):
        Trainer(cfg)
    with pytest.raises(ConfigError, match="teachers.t.urls\\[0\\]: 'localhost:8000' is not an http"):
        _config(tmp_path, tiny_student_dir, tiny_teacher_dir, arithmetic_file,
                **{"teachers.t.backend": "remote", "teachers.t.urls": "[localhost:8000]"})
    with pytest.raises(ConfigError, match="teachers.t.api: 'openai' is not one of"):
        _config(tmp_path, tiny_student_dir, tiny_teacher_dir, arithmetic_file, **{"teachers.t.api": "openai"})


def test_two_teachers_one_served_one_in_process_train_like_two_in_process(server, tmp_path, tiny_student_dir,
                                                                          tiny_teacher_dir):
    from helpers import write_jsonl

    rows = [{"id": f"{d}{i}", "domain": d, "prompt": f"{i}{'+' if d == 'add' else '-'}{i}=",
             "answer": str(2 * i if d == "add" else 0), "verifier": "exact"} for i in range(6) for d in ("add", "sub")]
    data = write_jsonl(tmp_path / "two.jsonl", rows)
    losses = {}
    for name, sub in (("local", {}), ("served", {"teachers.sub.backend": "remote", "teachers.sub.urls": f"[{server.url}]",
                                                 "teachers.sub.api": "uniopd"})):
        cfg = tiny_run_config(tiny_student_dir, tiny_teacher_dir, data, tmp_path / name / "run",
                              **{"teachers.t.domains": "[add]", "teachers.sub.path": str(tiny_teacher_dir),
                                 "teachers.sub.domains": "[sub]", "logging.diagnostics": "false", **sub})
        trainer = Trainer(cfg)
        trainer.train()
        metrics = [json.loads(line) for line in open(tmp_path / name / "run" / "metrics.jsonl")]
        losses[name] = [m["loss"] for m in metrics]
        assert all(m["teacher/sub/failed_rows"] == 0 and "teacher/t/tokens_per_s" in m for m in metrics)
        for teacher in trainer.teachers.values():
            teacher.close()
    assert losses["local"] == pytest.approx(losses["served"], abs=1e-5, rel=0)
