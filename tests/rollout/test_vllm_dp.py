"""vLLM in a data-parallel run, for real on vllm-cpu (`pytest -m vllm`): two gloo processes
through `uniopd train --nproc 2`, each sampling its share of the prompts with its own engine,
each engine given the updated weights after every step, each scoring its rows with its own
in-process vLLM teacher; and the two processes holding one engine's tensor-parallel shards."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of RAM for each engine's KV cache on CPU
pytest.importorskip("vllm")

from dp_runs import final_weights, metric_rows, train  # noqa: E402
from helpers import make_tiny_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

pytestmark = pytest.mark.vllm


def _logps(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


def test_two_processes_sample_and_score_with_their_own_engines_synced_every_step(tmp_path, arithmetic_file):
    # vLLM's CPU attention kernels take head_dim 32 and up: 4 heads of 32.
    student = make_tiny_model(tmp_path / "student", hidden=128, seed=1)
    teacher = make_tiny_model(tmp_path / "teacher", hidden=128, seed=2)
    out = tmp_path / "run"
    done = train([f"model.path={student}", f"teachers.t.path={teacher}", f"data.train={arithmetic_file}",
                  "rollout.backend=vllm", "teachers.t.backend=vllm", "rollout.prompts_per_step=4", "rollout.n=2",
                  "rollout.max_new_tokens=6", "trainer.micro_batch_size=4", "trainer.lr=3e-3", "trainer.steps=3", "trainer.save_every=3",
                  "logging.progress=false", "logging.tensorboard=false", "logging.diagnostics=false"],
                 out, nproc=2, timeout=900)
    rows = metric_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert done.stderr.count("rollout: vllm engine") == 2, done.stderr[-3000:]  # one engine per process
    # The largest |engine - trainer| log-prob over both processes' rows, every step: each engine
    # sampled from the weights of that step (after steps 1 and 2, only through the weight sync).
    assert all(r["rollout/logprob_diff_max"] < 1e-3 for r in rows), [r["rollout/logprob_diff_max"] for r in rows]
    assert all(r["update/tokens"] > 0 and r["teacher/t/failed_rows"] == 0 for r in rows)

    _assert_moved(student, out)


def test_two_processes_share_one_tensor_parallel_engine(tmp_path, arithmetic_file):
    student = make_tiny_model(tmp_path / "student", hidden=128, seed=1)
    teacher = make_tiny_model(tmp_path / "teacher", hidden=128, seed=2)
    out = tmp_path / "run"
    done = train([f"model.path={student}", f"teachers.t.path={teacher}", f"data.train={arithmetic_file}",
                  f"data.eval={arithmetic_file}", "trainer.eval_every=2", "trainer.eval_n=2",
                  "rollout.backend=vllm", "rollout.vllm_tensor_parallel_size=2", "rollout.prompts_per_step=4",
                  "rollout.n=2", "rollout.max_new_tokens=6", "trainer.micro_batch_size=4", "trainer.lr=3e-3",
                  "trainer.steps=3", "trainer.save_every=3", "balance.online=true", "balance.max_resample=1",
                  "logging.progress=false", "logging.tensorboard=false", "logging.diagnostics=false"],
                 out, nproc=2, timeout=900)
    rows = metric_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert done.stderr.count("tensor parallel 2") == 2, done.stderr[-3000:]  # one shard per process
    # Each shard samples both processes' prompts; each process trains only its own share back:
    # 4 prompts x 2 kept rollouts over both processes, not twice that.
    assert all(r["update/rows"] == 8 and r["balance/kept"] == 8 for r in rows), rows
    # Both shards were synced after every update, in place (the engine's log-probs are the trainer's).
    assert all(r["rollout/logprob_diff_max"] < 1e-3 for r in rows), [r["rollout/logprob_diff_max"] for r in rows]
    # Process 0's evaluation ran with the other shard sampling alongside (without it vLLM would hang).
    assert "eval/avg@2" in rows[1] and "eval/avg@2" not in rows[0]
    _assert_moved(student, out)


def _assert_moved(student, out) -> None:
    """The updates moved the student's log-probs on a fixed sequence by more than 1e-2, so the
    1e-3 mismatch checks would have caught an engine left with the first weights."""
    before = AutoModelForCausalLM.from_pretrained(student).eval()
    after = AutoModelForCausalLM.from_pretrained(student).eval()
    missing, unexpected = after.load_state_dict(final_weights(out), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    ids = [1] + list(range(5, 25))
    assert float((_logps(before, ids) - _logps(after, ids)).abs().max()) > 1e-2
