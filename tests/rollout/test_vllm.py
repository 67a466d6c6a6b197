"""The vLLM rollout engine, for real on vllm-cpu (run in the vLLM venv: `pytest -m vllm`).

Done-when checks: the engine's sampled log-probs equal the trainer's within 1e-3 (fp32), a
perturbation of the trainer's weights reaches the engine only through `update_weights` (and
the prefix cache does not serve stale keys), and 20 training steps with rollout.backend=vllm
reach a teacher KL comparable to the hf engine's on the same seed. Faults: prompts past the
engine's room follow data.overlong; an engine that dies mid-run stops `uniopd train` with the
last checkpoint intact, and `--resume` continues.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of RAM for the KV cache on CPU
pytest.importorskip("vllm")

from helpers import make_tiny_model, tiny_run_config  # noqa: E402

from uniopd.batch import Sample  # noqa: E402
from uniopd.cli import main  # noqa: E402
from uniopd.config import RolloutConfig, load_config  # noqa: E402
from uniopd.data.prompts import prepare_prompts  # noqa: E402
from uniopd.data.records import PromptRecord  # noqa: E402
from uniopd.models.forward import build_layout, response_logprobs  # noqa: E402
from uniopd.models.loading import load_model  # noqa: E402
from uniopd.config import ModelConfig  # noqa: E402
from uniopd.rollout.base import build_rollout_engine  # noqa: E402
from uniopd.train.checkpoint import find_resumable, verify_checkpoint  # noqa: E402
from uniopd.train.trainer import Trainer  # noqa: E402

pytestmark = pytest.mark.vllm


# vLLM's CPU attention kernels take head_dim 32 and up: 4 heads of 32.
@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("vllm_student"), layers=2, hidden=128, seed=1)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("vllm_teacher"), layers=2, hidden=128, seed=2)


def trainer_logps(loaded, samples: list[Sample], temperature: float = 1.0) -> list[torch.Tensor]:
    layout = build_layout([s.prompt_ids for s in samples], [s.response_ids for s in samples],
                          loaded.tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        logp_N, _ = response_logprobs(loaded.model.eval(), layout, temperature=temperature)
    return list(logp_N.split([len(s.response_ids) for s in samples]))


def max_diff(loaded, groups, temperature=1.0) -> float:
    samples = [s for g in groups for s in g]
    return max(float((torch.tensor(s.logprobs) - t).abs().max())
               for s, t in zip(samples, trainer_logps(loaded, samples, temperature)) if s.response_ids)


def test_engine_samples_like_the_hf_engine_and_follows_weight_updates(student_dir):
    loaded = load_model(ModelConfig(path=str(student_dir)), trainable=True)
    cfg = RolloutConfig(backend="vllm", n=3, max_new_tokens=12, temperature=0.8)
    engine = build_rollout_engine(cfg, loaded)
    try:
        tok = loaded.tokenizer
        prompts = [tok("1+2=")["input_ids"], tok("30+4=")["input_ids"]]
        groups = engine.sample(prompts, 3, generator=torch.Generator().manual_seed(0))
        assert [len(g) for g in groups] == [3, 3]
        for prompt, group in zip(prompts, groups):
            for s in group:
                assert s.prompt_ids == prompt and len(s.logprobs) == len(s.response_ids) <= 12
                assert s.finished == (s.response_ids[-1] == tok.eos_token_id)
                assert tok.eos_token_id not in s.response_ids[:-1]
        # Seeded from the caller's generator: the same seed gives the same rollouts.
        again = engine.sample(prompts, 3, generator=torch.Generator().manual_seed(0))
        assert [[s.response_ids for s in g] for g in again] == [[s.response_ids for s in g] for g in groups]
        # Log-probs under logits / temperature, as the trainer computes them.
        assert max_diff(loaded, groups, 0.8) < 1e-3

        # Change the trainer's weights: the engine does not see it until update_weights.
        with torch.no_grad():
            for p in loaded.model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        stale = engine.sample(prompts, 3, generator=torch.Generator().manual_seed(1))
        assert max_diff(loaded, stale, 0.8) > 1e-2
        engine.update_weights(loaded.model)
        fresh = engine.sample(prompts, 3, generator=torch.Generator().manual_seed(1))  # same prompts: cached prefixes
        assert max_diff(loaded, fresh, 0.8) < 1e-3

        greedy = engine.sample(prompts[:1], 1, greedy=True)
        assert greedy[0][0].response_ids == engine.sample(prompts[:1], 1, greedy=True)[0][0].response_ids

        # The tiny model's 128 positions leave 116 for a prompt next to 12 new tokens: a longer one
        # is truncated by data.overlong before it reaches vLLM, and samples.
        limit = engine.prompt_limit(1024)
        assert limit.tokens == 116 and "max_model_len 128" in limit.keys, limit
        cfg_run = load_config(None, ["data.overlong=truncate"])
        long = PromptRecord(id="long", domain="d", prompt="7" * 200 + "+1=", answer="8")
        _, ids, stats = prepare_prompts([long], tok, cfg_run.model, cfg_run.data, limit=limit)
        assert len(ids[0]) == 116 and stats["truncated"] == 1
        assert len(engine.sample(ids, 1, generator=torch.Generator().manual_seed(0))[0]) == 1
        with pytest.raises(ValueError, match="a prompt of 117 tokens does not fit"):
            engine.sample([ids[0] + ids[0][:1]], 1)  # a caller that skipped the limit: refused before vLLM

        # More prompt tokens in one call than vLLM's 4096-token step budget: with chunked prefill
        # a seeded request's CPU generator was rewound and vLLM raised (the demo's 32 x 8 rollouts).
        wide = [[(i * 7 + j) % 60 + 3 for j in range(100)] for i in range(6)]
        assert [len(g) for g in engine.sample(wide, 8, generator=torch.Generator().manual_seed(0))] == [8] * 6
    finally:
        engine.close()


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in open(run / "metrics.jsonl")]


def test_twenty_steps_with_vllm_rollouts_match_hf_teacher_kl(tmp_path, student_dir, teacher_dir, arithmetic_file):
    common = {"trainer.steps": 20, "trainer.lr": 3e-3, "rollout.max_new_tokens": 8, "rollout.n": 4,
              "trainer.save_every": 0, "logging.diagnostics": "false"}
    kl = {}
    for backend in ("hf", "vllm"):
        cfg = tiny_run_config(student_dir, teacher_dir, arithmetic_file, tmp_path / backend,
                              **{"rollout.backend": backend}, **common)
        trainer = Trainer(cfg)
        try:
            result = trainer.train()
            rows = _metrics(tmp_path / backend)
            assert result["step"] == 20 and len(rows) == 20
            kl[backend] = [r["teacher_kl"] for r in rows]
            if backend == "vllm":
                # Every step: the engine's log-probs were replaced by the trainer's, the mismatch logged.
                assert all(r["rollout/logprob_diff_max"] < 1e-3 for r in rows), [r["rollout/logprob_diff_max"]
                                                                               for r in rows]
                # After the last update the engine samples from the synced weights.
                prompts = trainer.prompt_ids[:2]
                groups = trainer.engine.sample(prompts, 2, generator=torch.Generator().manual_seed(3))
                assert max_diff(trainer.student, groups) < 1e-3
        finally:
            trainer.engine.close()
    first, last = (lambda xs: sum(xs[:5]) / 5), (lambda xs: sum(xs[-5:]) / 5)
    print("teacher_kl first5/last5", {b: (round(first(v), 4), round(last(v), 4)) for b, v in kl.items()})
    for backend, values in kl.items():
        assert last(values) < first(values), (backend, values)  # both learn
    assert abs(last(kl["vllm"]) - last(kl["hf"])) <= 0.25 * last(kl["hf"]) + 0.05, kl


@pytest.mark.gpu
def test_on_a_gpu_sleep_mode_frees_memory_and_the_sync_still_lands(student_dir):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    loaded = load_model(ModelConfig(path=str(student_dir), dtype="bfloat16"), device="cuda")
    cfg = RolloutConfig(backend="vllm", n=2, max_new_tokens=12, vllm_enable_sleep_mode=True,
                        vllm_gpu_memory_utilization=0.3)
    engine = build_rollout_engine(cfg, loaded)
    try:
        prompts = [loaded.tokenizer("1+2=")["input_ids"]]
        free_awake = torch.cuda.mem_get_info()[0]
        engine.sample(prompts, 2, generator=torch.Generator("cuda").manual_seed(0))
        assert torch.cuda.mem_get_info()[0] > free_awake  # asleep after sampling: KV cache and weights released
        with torch.no_grad():
            for p in loaded.model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        engine.update_weights(loaded.model)
        groups = engine.sample(prompts, 2, generator=torch.Generator("cuda").manual_seed(1))
        samples = [s for g in groups for s in g]
        layout = build_layout([s.prompt_ids for s in samples], [s.response_ids for s in samples],
                              loaded.tokenizer.pad_token_id, "cuda")
        with torch.no_grad():
            logp_N, _ = response_logprobs(loaded.model.eval(), layout)
        engine_N = torch.tensor([lp for s in samples for lp in s.logprobs], device="cuda")
        assert float((logp_N.float() - engine_N).abs().mean()) < 0.05  # bf16 kernels differ, weights synced
    finally:
        engine.close()


def test_an_engine_that_dies_mid_run_stops_training_and_resume_continues(tmp_path, student_dir, teacher_dir,
                                                                        arithmetic_file, capsys):
    """The engine dies after the 2nd update (tests/vllm_faults.py): `uniopd train` fails at step 3
    naming the engine, checkpoint 2 verifies, and `--resume` with a fresh engine finishes the run."""
    out = tmp_path / "run"
    args = ["-c", str(tmp_path / "recipe.yaml")]
    (tmp_path / "recipe.yaml").write_text(json.dumps({  # JSON is YAML
        "model": {"path": str(student_dir)}, "teachers": {"t": {"path": str(teacher_dir)}},
        "data": {"train": str(arithmetic_file)},
        "rollout": {"prompts_per_step": 2, "n": 2, "max_new_tokens": 4},
        "trainer": {"steps": 4, "save_every": 1, "keep_checkpoints": 2, "micro_batch_size": 4,
                    "output_dir": str(out)},
        "logging": {"progress": False, "tensorboard": False, "diagnostics": False}}))
    before = torch.get_num_threads()
    try:
        assert main(["train", *args, "rollout.backend=vllm_faults:VLLMEngineThatDies"]) == 2
        err = capsys.readouterr().err
        assert ("rollout engine rollout.backend=vllm_faults:VLLMEngineThatDies (vLLM) failed while sampling"
                in err and "at step 3, stopping without saving" in err), err
        assert "step_000002, is intact: uniopd train --resume continues from it" in err, err
        assert find_resumable(out) == out / "checkpoints" / "step_000002"
        assert verify_checkpoint(out / "checkpoints" / "step_000002")["step"] == 2

        assert main(["train", *args, "--resume", "rollout.backend=vllm"]) == 0
    finally:
        torch.set_num_threads(before)
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3, 4]
    assert verify_checkpoint(find_resumable(out))["step"] == 4
