from __future__ import annotations

import os
import threading
import time

import pytest

from uniopd.data.records import PromptRecord
from uniopd.rewards import MathVerifier, verify_batch
from uniopd.rewards.math import MathWorkerPool, check_math, get_pool

pytest.importorskip("math_verify")


def rec(answer, rid="m"):
    return PromptRecord(id=rid, domain="math", prompt="q", answer=answer)


# A real input on which math-verify (sympy) runs for minutes.
HANGS = "\\boxed{9^{9^{9^{9}}}}"


@pytest.fixture(scope="module")
def pool():
    p = MathWorkerPool(num_workers=2)
    yield p
    p.close()


@pytest.mark.parametrize(
    "gold, response, status",
    [
        ("42", "The answer is \\boxed{42}.", "pass"),
        ("\\frac{1}{2}", "so $x = 0.5$", "pass"),
        ("1/2", "\\boxed{\\frac12}", "pass"),
        ("x^2+1", "\\boxed{1+x^2}", "pass"),
        ("\\{1,2\\}", "\\boxed{\\{2,1\\}}", "pass"),
        ("\\sqrt{2}", "\\boxed{\\frac{2}{\\sqrt2}}", "pass"),
        ("3", "\\boxed{4}", "fail"),
        ("3", "I do not know", "fail"),
    ],
)
def test_equivalence_in_the_pool(pool, gold, response, status):
    assert pool.map([(gold, response)], timeout_s=20)[0][0] == status


def test_check_math_in_process():
    assert check_math("7", "\\boxed{7}") == ("pass", "")
    status, reason = check_math("7", "\\boxed{8}")
    assert status == "fail" and "8" in reason


def test_verifier_outcomes_and_fast_path(monkeypatch):
    v = MathVerifier(timeout_s=20)
    # The fast path answers without the pool.
    monkeypatch.setattr("uniopd.rewards.math.get_pool", lambda n: pytest.fail("pool used"))
    assert v.verify("\\boxed{579.0}", rec("579")).correct
    assert v.verify("answer: 1/2", rec("0.5")).correct
    assert v.verify("x", rec(None)).status == "error"
    monkeypatch.undo()
    out = v.verify("so \\boxed{\\frac{3}{6}}", rec("0.5"))
    assert out.correct and out.score == 1.0
    out = v.verify("\\boxed{5}", rec("4"))
    assert out.status == "fail" and out.score == 0.0 and out.reason


def test_hung_item_times_out_is_killed_and_the_pool_recovers(pool):
    pool.map([("1", "\\boxed{2}")], timeout_s=20)  # workers up
    before = {w.proc.pid for w in pool.workers}
    start = time.monotonic()
    results = pool.map([("1", HANGS), ("2", "\\boxed{2}"), ("3", "\\boxed{3}")], timeout_s=1.0)
    elapsed = time.monotonic() - start
    assert results[0][0] == "timeout" and "1s" in results[0][1]
    assert [r[0] for r in results[1:]] == ["pass", "pass"]
    assert elapsed < 10
    # The worker that hung is gone; a fresh one replaced it.
    after = {w.proc.pid for w in pool.workers}
    dead = before - after
    assert len(dead) == 1 and len(after) == 2
    for pid in dead:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    assert pool.map([("4", "\\boxed{4}")], timeout_s=20)[0][0] == "pass"


def test_verify_batch_uses_a_persistent_pool():
    records = [rec("2", "a"), rec("\\frac{1}{3}", "b"), rec("5", "c")]
    responses = ["\\boxed{1+1}", "\\boxed{2/6}", "\\boxed{6}"]
    outs = verify_batch(responses, records, timeout_s=20)
    assert [o.status for o in outs] == ["pass", "pass", "fail"]
    pids = {w.proc.pid for w in get_pool(2).workers}
    outs = verify_batch(responses, records, timeout_s=20)
    assert [o.status for o in outs] == ["pass", "pass", "fail"]
    assert {w.proc.pid for w in get_pool(2).workers} == pids  # same worker processes


def test_pool_is_thread_safe(pool):
    results = {}

    def work(k):
        results[k] = pool.map([(str(k), f"\\boxed{{{k}}}"), (str(k), "\\boxed{-1}")], timeout_s=20)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all([s for s, _ in results[k]] == ["pass", "fail"] for k in range(4))
