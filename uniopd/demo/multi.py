"""`uniopd demo --multi-teacher`: two domain experts distilled into one student.

Uni-OPD's multi-teacher setting on the demo's data: an addition teacher trained on
addition only and a subtraction teacher trained on subtraction only (each strong on its
own domain, near zero on the other), and one weaker student trained briefly on both.
Every training record's `domain` routes its rollouts to that domain's teacher, so a
mixed batch is scored by two teachers; the student should move toward the right expert
on each domain. Prints a per-domain table: both teachers, the student before and after.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from uniopd.data.loader import write_records
from uniopd.demo.build import (STUDENT, TEACHER, TinyModelSpec, build_model, default_cache_dir, heldout_records,
                               mixed_records)
from uniopd.demo.run import accuracy_by_domain, distil

DOMAINS = ("addition", "subtraction")
# Subtraction is learned more slowly than addition, and the 98 % validation target stopped
# its expert too soon. Validation prompts are all among the SFT prompts (two-digit
# subtraction has ~4,000 problems; SFT draws 20,000), so validation accuracy measures fit:
# 98 % there was 93 % held out. Training on to 100 % (1,400 steps, seed 0) gave 99.5 %.
EXPERTS = {"addition": TEACHER,
           "subtraction": replace(TEACHER, tasks=("subtraction",), sft_steps=2000, target_acc=1.0, eval_every=100)}
# Stops when both domains reach the student's target (20 % on validation); a student that
# reached 20 % overall with addition still near 13 % was not lifted by OPD on addition.
MIXED_STUDENT = replace(STUDENT, tasks=DOMAINS, sft_steps=2 * STUDENT.sft_steps, each_task=True)
MULTI_STEPS = 300  # each domain gets half of every batch, so more steps than the single-teacher demo
# At the single-teacher demo's lr (3e-4) this student's teacher KL stays flat: from an empty
# cache it went from 20.5 / 27.5 % to 30.0 / 30.0 % (addition / subtraction) in 300 steps.
MULTI_OVERRIDES = ("trainer.lr=1e-4",)


def run_multi_teacher_demo(*, seed: int = 0, out_dir: Path = Path("runs/demo_multi"), steps: int | None = None,
                           methods: list[str] | tuple[str, ...] = ("opd",), cache_dir: Path | None = None,
                           progress: bool = True, log=print, experts: dict[str, TinyModelSpec] | None = None,
                           student_spec: TinyModelSpec = MIXED_STUDENT, num_train: int = 2000,
                           num_heldout: int = 200, extra: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    t0 = time.perf_counter()
    experts = experts or EXPERTS
    steps = steps or MULTI_STEPS
    cache_dir = cache_dir or default_cache_dir() / "demo"
    out_dir = Path(out_dir)
    eval_recs = [r for d in DOMAINS for r in heldout_records(num_heldout, task=d)]
    # Same seed scheme as the single-teacher demo: far from the SFT and held-out seeds.
    train_recs = mixed_records(num_train, seed=1_000_000 * (seed + 1), tasks=DOMAINS, prefix="train")
    train_file = out_dir / "data" / "train.jsonl"
    write_records(train_file, train_recs)
    write_records(out_dir / "data" / "heldout.jsonl", eval_recs)
    log(f"uniopd multi-teacher demo: {' and '.join(DOMAINS)}, one teacher per domain; {len(train_recs)} "
        f"training prompts, {len(eval_recs)} held-out")

    teacher_dirs = {}
    for d in DOMAINS:
        teacher_dirs[d], cached = build_model("teacher", experts[d], cache_dir, progress=progress, log=log)
        log(f"{d} teacher: {teacher_dirs[d]}{' (cached)' if cached else ''}")
    student_dir, cached = build_model("student", student_spec, cache_dir, progress=progress, log=log)
    log(f"student: {student_dir}{' (cached)' if cached else ''}")

    rows: dict[str, dict[str, float]] = {f"teacher {d}": accuracy_by_domain(p, eval_recs)
                                         for d, p in teacher_dirs.items()}
    rows["student before"] = accuracy_by_domain(student_dir, eval_recs)
    results: dict[str, Any] = {"seed": seed, "steps": steps, "accuracy": rows, "methods": {}}
    for method in methods:
        run_dir = out_dir / method
        result, final, secs = distil(student_dir, teacher_dirs, train_file, run_dir, seed=seed, steps=steps,
                                     method=method, progress=progress, extra=(*MULTI_OVERRIDES, *extra))
        rows[f"student + {method}"] = accuracy_by_domain(final, eval_recs)
        results["methods"][method] = {"train_seconds": secs, "checkpoint": str(final),
                                      "metrics_path": result["metrics_path"]}
        log(f"{method}: {steps} steps in {secs:.0f}s; metrics: {result['metrics_path']}")

    log("")
    log(f"{'held-out accuracy':22s}" + "".join(f"{d:>13s}" for d in DOMAINS))
    for label, acc in rows.items():
        log(f"{label:22s}" + "".join(f"{acc.get(d, 0.0):>13.1%}" for d in DOMAINS))
    results["total_seconds"] = time.perf_counter() - t0
    (out_dir / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
    log(f"\nsummary: {out_dir / 'summary.json'}  ({results['total_seconds']:.0f}s in all)")
    return results
