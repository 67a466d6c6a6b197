"""Milliseconds per decode step of the rollout's student: the lean step against the model's forward.

    python benchmarks/decode_step.py [--threads 1 2] [--rows 8] [--prompt 52] [--new 64]

Same model (step_throughput's ~30M random Llama student), same prefilled cache and same
tokens; `uniopd.cpu.lean.LeanDecoder` (step + head, its weight packing included in
the time) and `model.model(...)` with a DynamicCache + the head as W @ h^T (the decode path
before the lean step) alternate repetition by repetition so machine noise hits both;
medians after the first. Sampling is shared by both and not timed. The last columns time
the body's weight matrices alone at the same row count, (W @ h^T) per projection, against
one streaming read of the same bytes: the gap is what a GEMM that thin leaves on the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_models import build_models  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--prompt", type=int, default=52)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, DynamicCache

    from uniopd.cpu.lean import LeanDecoder
    from uniopd.cpu.packed import thin_linear
    from uniopd.models.compat import cache_kwargs

    student, _ = build_models(args)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    B, P, T = args.rows, args.prompt, args.new
    gen = torch.Generator().manual_seed(0)
    ids_BP = torch.randint(0, model.config.vocab_size, (B, P), generator=gen)
    toks_BT = torch.randint(0, model.config.vocab_size, (B, T), generator=gen)
    head_VH = model.get_output_embeddings().weight.detach()

    @torch.inference_mode()
    def ms_per_step(kind: str) -> float:
        cache = DynamicCache()
        model.model(input_ids=ids_BP, **cache_kwargs(model.model, cache), use_cache=True)
        t0 = time.perf_counter()
        lean = LeanDecoder(model, cache, None, T, head_VH=head_VH) if kind == "lean" else None
        for t in range(T):
            pos_B = torch.full((B,), P + t)
            if lean is not None:
                lean.head(lean.step(toks_BT[:, t], pos_B))
            else:
                out = model.model(input_ids=toks_BT[:, t:t + 1], position_ids=pos_B[:, None],
                                  **cache_kwargs(model.model, cache), use_cache=True)
                thin_linear(out.last_hidden_state[:, -1], head_VH).contiguous()
        return (time.perf_counter() - t0) / T * 1e3

    weights = [m.weight for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    flat = torch.cat([w.detach().reshape(-1) for w in weights])
    h = {k: torch.randn(B, k) for k in {w.shape[1] for w in weights}}

    @torch.inference_mode()
    def gemm_ms() -> float:
        t0 = time.perf_counter()
        for w in weights:
            w @ h[w.shape[1]].T
        return (time.perf_counter() - t0) * 1e3

    def read_ms() -> float:
        t0 = time.perf_counter()
        flat.sum()
        return (time.perf_counter() - t0) * 1e3

    out = {"rows": B, "prompt": P, "new": T, "body_weight_mb": nbytes / 1e6, "threads": {}}
    for threads in args.threads:
        torch.set_num_threads(threads)
        runs: dict[str, list[float]] = {"hf": [], "lean": [], "gemms": [], "read": []}
        for _ in range(args.reps + 1):
            runs["hf"].append(ms_per_step("hf"))
            runs["lean"].append(ms_per_step("lean"))
            runs["gemms"].append(gemm_ms())
            runs["read"].append(read_ms())
        med = {k: statistics.median(v[1:]) for k, v in runs.items()}
        out["threads"][threads] = med
        print(f"{threads} thread(s), {B} rows: model forward + head {med['hf']:.2f} ms/step, lean step {med['lean']:.2f} "
              f"({med['hf'] / med['lean']:.2f}x); body GEMMs alone {med['gemms']:.2f} ms "
              f"({nbytes / med['gemms'] / 1e6:.1f} GB/s) vs reading the same {nbytes / 1e6:.0f} MB "
              f"{med['read']:.2f} ms ({nbytes / med['read'] / 1e6:.1f} GB/s)")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
