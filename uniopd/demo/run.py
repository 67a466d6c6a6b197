"""`uniopd demo`: plain OPD and Uni-OPD on multi-digit addition, offline, on a CPU.

1. Data from reasoning-gym: OPD training prompts (seeded by --seed) and a fixed held-out set.
2. A teacher and a weaker student are built once (SFT from scratch) and cached.
3. Each method distils the same student from the same teacher with `uniopd.train.trainer`.
4. Student-before, student-after (per method) and teacher accuracy on the held-out prompts.
The teacher and student builds do not depend on --seed (so they are cached once); --seed
changes the OPD prompts, their order and every sampled rollout.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from uniopd.config import ModelConfig, load_config
from uniopd.data.loader import write_records
from uniopd.demo.build import (DIGITS, STUDENT, TEACHER, TinyModelSpec, arithmetic_records, build_model,
                               default_cache_dir, greedy_accuracy, heldout_records)
from uniopd.models.loading import load_model

DEFAULT_STEPS = 200


def method_overrides(method: str) -> list[str]:
    """The demo's recipe for each method: identical except for the Uni-OPD switches."""
    if method == "opd":
        return []
    if method == "uniopd":
        return ["calibration.enabled=true", "calibration.method=shift", "calibration.delta=0.4",
                "balance.online=true", "balance.oversample=2.0", "balance.max_resample=1"]
    raise ValueError(f"unknown demo method {method!r} (choose opd or uniopd)")


def demo_config(student: Path, teacher: Path | dict[str, Path], train_file: Path, out: Path, *, seed: int,
                steps: int, method: str, progress: bool, extra: list[str] | tuple[str, ...] = ()):
    """The demo's run config. `teacher` is one path, or {domain: path} for one teacher per domain."""
    if isinstance(teacher, dict):
        teachers = [f"teachers.{d}.{k}={v}" for d, path in teacher.items()
                    for k, v in (("path", path), ("domains", f"[{d}]"), ("chat_template", "false"))]
    else:
        teachers = [f"teachers.teacher.path={teacher}", "teachers.teacher.chat_template=false"]
    base = [f"model.path={student}", f"data.train={train_file}", *teachers,
            f"trainer.output_dir={out}", f"trainer.seed={seed}", f"trainer.steps={steps}",
            "model.chat_template=false",
            "rollout.prompts_per_step=32", "rollout.n=8", "rollout.max_new_tokens=6", "rollout.batch_size=512",
            "trainer.lr=3e-4", "trainer.warmup_steps=10", "trainer.micro_batch_size=256", "trainer.save_every=0",
            "trainer.keep_checkpoints=1", "loss.clip_high=0.28", "logging.diagnostics=false",
            "logging.tensorboard=false", f"logging.progress={str(progress).lower()}"]
    return load_config(None, base + method_overrides(method) + list(extra))


def distil(student: Path, teacher: Path | dict[str, Path], train_file: Path, run_dir: Path, *, seed: int,
           steps: int, method: str, progress: bool,
           extra: list[str] | tuple[str, ...] = ()) -> tuple[dict[str, Any], Path, float]:
    """One demo OPD run: (the trainer's result, its final checkpoint, seconds)."""
    from uniopd.train.trainer import Trainer

    cfg = demo_config(student, teacher, train_file, run_dir, seed=seed, steps=steps, method=method,
                      progress=progress, extra=extra)
    t = time.perf_counter()
    result = Trainer(cfg).train()
    return result, Path(run_dir) / "checkpoints" / f"step_{result['step']:06d}", time.perf_counter() - t


def accuracy_by_domain(model_dir: Path, records) -> dict[str, float]:
    """Greedy held-out accuracy per record domain, plus "all"."""
    return greedy_accuracy(load_model(ModelConfig(path=str(model_dir), chat_template=False), trainable=False),
                           records)


def _accuracy(model_dir: Path, records) -> float:
    return accuracy_by_domain(model_dir, records)["all"]


def run_demo(*, seed: int = 0, out_dir: Path = Path("runs/demo"), steps: int | None = None,
             methods: list[str] = ("opd", "uniopd"), cache_dir: Path | None = None, progress: bool = True,
             log=print, teacher_spec: TinyModelSpec = TEACHER, student_spec: TinyModelSpec = STUDENT,
             num_train: int = 2000, num_heldout: int = 300, extra: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Build (or reuse) the models, distil with each method, return and save the summary.

    The keyword arguments after `log` exist for tests and experiments (smaller models,
    fewer prompts, config overrides); the defaults are the demo.
    """
    t0 = time.perf_counter()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    steps = steps or DEFAULT_STEPS
    cache_dir = cache_dir or default_cache_dir() / "demo"
    out_dir = Path(out_dir)
    data_dir = out_dir / "data"
    eval_recs = heldout_records(num_heldout)
    # reasoning-gym seeds item i with Random(seed + i): seeds far apart give disjoint streams.
    train_recs = arithmetic_records(num_train, seed=1_000_000 * (seed + 1), prefix="train",
                                    exclude={r.prompt for r in eval_recs})
    train_file, eval_file = data_dir / "train.jsonl", data_dir / "heldout.jsonl"
    write_records(train_file, train_recs)
    write_records(eval_file, eval_recs)
    log(f"uniopd demo: {DIGITS}-digit addition from reasoning-gym; {len(train_recs)} training prompts, "
        f"{len(eval_recs)} held-out (data in {data_dir})")

    seconds: dict[str, float] = {}
    t = time.perf_counter()
    teacher_dir, cached_t = build_model("teacher", teacher_spec, cache_dir, progress=progress, log=log)
    seconds["teacher_build"] = time.perf_counter() - t
    t = time.perf_counter()
    student_dir, cached_s = build_model("student", student_spec, cache_dir, progress=progress, log=log)
    seconds["student_build"] = time.perf_counter() - t
    for kind, path, cached in (("teacher", teacher_dir, cached_t), ("student", student_dir, cached_s)):
        log(f"{kind}: {path} " + ("(cached)" if cached else f"(built in {seconds[kind + '_build']:.0f}s)"))

    t = time.perf_counter()
    acc_teacher = _accuracy(teacher_dir, eval_recs)
    acc_before = _accuracy(student_dir, eval_recs)
    seconds["eval"] = time.perf_counter() - t
    log(f"held-out accuracy (greedy): teacher {acc_teacher:.1%}, student before OPD {acc_before:.1%}")
    results: dict[str, Any] = {"seed": seed, "steps": steps, "teacher_acc": acc_teacher,
                               "student_before_acc": acc_before, "seconds": seconds, "methods": {}}
    for method in methods:
        run_dir = out_dir / method
        result, final, secs = distil(student_dir, teacher_dir, train_file, run_dir, seed=seed, steps=steps,
                                     method=method, progress=progress, extra=extra)
        acc_after = _accuracy(final, eval_recs)
        results["methods"][method] = {"student_after_acc": acc_after, "train_seconds": secs,
                                      "metrics_path": result["metrics_path"], "checkpoint": str(final),
                                      "final_teacher_kl": result["metrics"].get("teacher_kl")}
        log(f"{method:>7}: student after {steps} steps {acc_after:.1%} ({secs:.0f}s); "
            f"metrics: {result['metrics_path']}")

    log("")
    log(f"{'':18s}{'held-out accuracy':>18s}")
    log(f"{'teacher':18s}{acc_teacher:>18.1%}")
    log(f"{'student before':18s}{acc_before:>18.1%}")
    for method, r in results["methods"].items():
        log(f"{'student + ' + method:18s}{r['student_after_acc']:>18.1%}")
    results["total_seconds"] = time.perf_counter() - t0
    (out_dir / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
    log(f"\nsummary: {out_dir / 'summary.json'}  ({results['total_seconds']:.0f}s in all)")
    return results
