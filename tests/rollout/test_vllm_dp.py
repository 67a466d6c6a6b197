"""vLLM in a data-parallel run, for real on vllm-cpu (`pytest -m vllm`): two gloo processes
through `uniopd train --nproc 2`, each sampling its share of the prompts with its own engine,
each engine given the updated weights after every step, each scoring its rows with its own
in-process vLLM teacher."""

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

    # The check above can fail: the updates moved the student far more than 1e-3 in log-prob, so an
    # engine left with the first weights would have been caught.
    before = AutoModelForCausalLM.from_pretrained(student).eval()
    after = AutoModelForCausalLM.from_pretrained(student).eval()
    missing, unexpected = after.load_state_dict(final_weights(out), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    ids = [1] + list(range(5, 25))
    assert float((_logps(before, ids) - _logps(after, ids)).abs().max()) > 1e-2
