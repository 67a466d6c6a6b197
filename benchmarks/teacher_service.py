"""Teacher-phase throughput: in-process scoring vs the same teacher behind `uniopd serve-teacher`.

    python benchmarks/teacher_service.py [--rows 32] [--response-tokens 170] [--repeats 3] [--threads 2]

The benchmark teacher of `step_throughput.py` (~50M, SmolLM2's 49k vocabulary) scores the same
rows of prompt + response tokens (a step's worth: 8 prompts x 4 rollouts by default) three ways:
in this process (`backend: local`), and through a loopback server with the compact API
(`api: uniopd`) and the vLLM-compatible one (`api: vllm`), sampled-token log-probs only and
with top-k 8. It prints tokens/s of each (response tokens scored per second, best of the
repeats, run interleaved) and a JSON last line. Server and client share the machine, and the client is idle
while the server computes, so the server gets the same threads the in-process teacher has.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--response-tokens", type=int, default=170)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from _bench_models import build_models
    from teacher_servers import ServeTeacher

    from uniopd.config import TeacherConfig
    from uniopd.data.records import PromptRecord
    from uniopd.models.loading import load_model, load_tokenizer
    from uniopd.teachers.local import LocalTeacher
    from uniopd.teachers.remote import RemoteTeacher

    _, teacher_dir = build_models(args)
    tok = load_tokenizer(TeacherConfig(path=str(teacher_dir)))
    gen = torch.Generator().manual_seed(0)
    records = [PromptRecord(id=f"q{i // 4}", domain="d", prompt=f"What is {1000 + i // 4} + {2000 + i // 4}?",
                            answer="0") for i in range(args.rows)]
    responses = [torch.randint(100, len(tok), (args.response_tokens,), generator=gen).tolist()
                 for _ in range(args.rows)]
    tokens = args.rows * args.response_tokens
    results: dict[str, list[float]] = {}
    loaded = load_model(TeacherConfig(path=str(teacher_dir)), trainable=False)
    server = ServeTeacher(teacher_dir, None, "--max-batch-tokens", "16384", threads=args.threads).start()
    scorers = {}
    try:
        for k in (None, 8):
            scorers[f"in-process{' top-8' if k else ''}"] = (
                LocalTeacher("t", TeacherConfig(path=str(teacher_dir), top_k=k), loaded, micro_batch_size=16), k)
        for api in ("uniopd", "vllm"):
            for k in (None, 8):
                cfg = TeacherConfig(path=str(teacher_dir), backend="remote", urls=[server.url], api=api, top_k=k,
                                    request_batch=4, concurrency=8, timeout_s=600)  # a loaded machine is slow
                scorers[f"served api={api}{' top-8' if k else ''}"] = (RemoteTeacher("t", cfg, tok), k)
        # Interleaved repeats, best of each: other load on a shared machine only ever slows a run down.
        for repeat in range(args.repeats + 1):
            for name, (scorer, k) in scorers.items():
                want = frozenset({"logp", "topk"}) if k else frozenset({"logp"})
                batch = (records[:4], responses[:4]) if repeat == 0 else (records, responses)  # 0: warm-up
                t = time.perf_counter()
                out = scorer.score(*batch, want=want)
                seconds = time.perf_counter() - t
                assert out.ok_S is None
                if repeat:
                    results.setdefault(name, []).append(seconds)
                    print(f"{name:28s} {tokens / seconds:9.0f} tokens/s ({seconds:.2f} s)", flush=True)
    finally:
        server.kill()
    best = {name: tokens / min(times) for name, times in results.items()}
    print("best of", args.repeats, {k: round(v) for k, v in best.items()})
    print(json.dumps({"rows": args.rows, "response_tokens": args.response_tokens, "threads": args.threads,
                      "tokens_per_s": {k: round(v) for k, v in best.items()}}))


if __name__ == "__main__":
    main()
