"""The demo's single-teacher OPD recipe with rollout.backend=hf and =vllm, same seed: teacher KL and held-out accuracy.

    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python benchmarks/vllm_vs_hf_demo.py --steps 100 --out /tmp/vllm_vs_hf

Uses the demo's cached teacher and student (`uniopd demo` builds them into ~/.cache/uniopd/demo;
this script builds them too if they are missing, ~10 min), its training prompts for --seed and
its 300 held-out prompts, and `uniopd.demo.run.demo_config` with method "opd" plus
`rollout.backend=<backend>`. Each backend trains in its own child process of this interpreter
(vLLM binds OpenMP threads and sets engine variables that should not reach the hf run). Reported
per backend: teacher KL, mean of the first and last 5 steps of metrics.jsonl; greedy held-out
accuracy of the final checkpoint (`uniopd.demo.run.accuracy_by_domain`); seconds per step; for
vllm the largest |engine - trainer| log-prob gap seen. The LAST line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _data(out: Path, seed: int) -> tuple[Path, list]:
    from uniopd.data.loader import write_records
    from uniopd.demo.build import arithmetic_records, heldout_records

    eval_recs = heldout_records(300)
    # As `run_demo`: reasoning-gym seeds item i with Random(seed + i), so seeds far apart are disjoint.
    train = arithmetic_records(2000, seed=1_000_000 * (seed + 1), prefix="train",
                               exclude={r.prompt for r in eval_recs})
    path = out / "train.jsonl"
    write_records(path, train)
    return path, eval_recs


def _models(out: Path) -> tuple[Path, Path]:
    from uniopd.demo.build import STUDENT, TEACHER, build_model, default_cache_dir

    cache = default_cache_dir() / "demo"
    return (build_model("teacher", TEACHER, cache, progress=False)[0],
            build_model("student", STUDENT, cache, progress=False)[0])


def train_one(backend: str, out: Path, seed: int, steps: int) -> dict:
    """One backend's run (in this process): the trainer's numbers and the final held-out accuracy."""
    import torch

    from uniopd.demo.run import accuracy_by_domain, distil

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))  # as `uniopd demo`
    teacher, student = _models(out)
    train_file, eval_recs = _data(out, seed)
    result, final, seconds = distil(student, teacher, train_file, out / backend, seed=seed, steps=steps,
                                    method="opd", progress=False, extra=[f"rollout.backend={backend}"])
    rows = [json.loads(line) for line in open(result["metrics_path"])]
    kl = [r["teacher_kl"] for r in rows]
    row = {"backend": backend, "steps": len(rows), "teacher_kl_first5": statistics.mean(kl[:5]),
           "teacher_kl_last5": statistics.mean(kl[-5:]), "heldout_acc": accuracy_by_domain(final, eval_recs)["all"],
           "train_seconds": seconds, "s_per_step_median": statistics.median(r["time/step"] for r in rows)}
    if backend == "vllm":
        row["logprob_diff_max"] = max(r["rollout/logprob_diff_max"] for r in rows)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backends", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    ap.add_argument("--out", type=Path, default=Path("runs/vllm_vs_hf_demo"))
    ap.add_argument("--one", choices=["hf", "vllm"], help=argparse.SUPPRESS)  # a child process's backend
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        print(json.dumps(train_one(args.one, args.out, args.seed, args.steps)))
        return
    from uniopd.demo.build import heldout_records
    from uniopd.demo.run import accuracy_by_domain

    teacher, student = _models(args.out)  # built once, before the children race for the cache
    eval_recs = heldout_records(300)
    summary = {"seed": args.seed, "steps": args.steps, "teacher_acc": accuracy_by_domain(teacher, eval_recs)["all"],
               "student_before_acc": accuracy_by_domain(student, eval_recs)["all"], "runs": []}
    for backend in args.backends:
        t = time.perf_counter()
        child = subprocess.run([sys.executable, __file__, "--one", backend, "--steps", str(args.steps),
                                "--seed", str(args.seed), "--out", str(args.out)],
                               check=True, stdout=subprocess.PIPE, text=True)
        row = json.loads(child.stdout.strip().splitlines()[-1])
        row["wall_seconds"] = time.perf_counter() - t
        summary["runs"].append(row)
        print(f"{backend:>5}: teacher KL {row['teacher_kl_first5']:.4f} -> {row['teacher_kl_last5']:.4f}, "
              f"held-out {row['heldout_acc']:.1%}, {row['s_per_step_median']:.2f} s/step", file=sys.stderr)
    print(f"teacher {summary['teacher_acc']:.1%}, student before {summary['student_before_acc']:.1%}",
          file=sys.stderr)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
