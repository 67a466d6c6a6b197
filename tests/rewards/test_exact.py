from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from uniopd.data.records import PromptRecord
from uniopd.rewards import get_verifier, verify_batch
from uniopd.rewards.exact import answers_match, extract_answer, extract_choice, last_boxed


def rec(answer, domain="arithmetic"):
    return PromptRecord(id="e", domain=domain, prompt="q", answer=answer)


@pytest.mark.parametrize(
    "response, expected",
    [
        ("so the result is \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("Answer: 17", "17"),
        ("answer: 3\nFinal ANSWER:  5 ", "5"),
        ("  just this  ", "just this"),
        ("\\boxed{a{b}c} answer: 9", "a{b}c"),  # boxed wins over answer:
    ],
)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


def test_last_boxed_unbalanced():
    assert last_boxed("\\boxed{unclosed") is None
    assert last_boxed("\\fbox{7}") == "7"


@pytest.mark.parametrize(
    "pred, gold, ok",
    [
        ("579", "579.0", True),
        ("579.", "579", True),
        ("1,000", "1000", True),
        ("1/2", "0.5", True),
        ("-3", "-3.00", True),
        ("Paris", "  paris. ", True),
        ("New   York", "new york", True),
        ("$12$", "12", True),
        ("579", "578", False),
        ("0.333", "1/3", False),
        ("abc", "abd", False),
        ("", "0", False),
    ],
)
def test_answers_match(pred, gold, ok):
    assert answers_match(pred, gold) is ok


def test_exact_verifier_outcomes():
    v = get_verifier("exact")
    out = v.verify("The sum is \\boxed{579.0}", rec("579"))
    assert out.correct and out.status == "pass" and out.score == 1.0 and out.reason == ""
    out = v.verify("Answer: 578", rec("579"))
    assert not out.correct and out.status == "fail" and out.score == 0.0 and "578" in out.reason
    assert v.verify("x", rec(None)).status == "error"
    assert v.verify("7", rec(7)).status == "pass"  # numeric answers in the record


@pytest.mark.parametrize(
    "response, letter",
    [
        ("(B)", "B"),
        ("B. Paris", "B"),
        ("Answer: C", "C"),
        ("answer: (d)", "D"),
        ("I think the answer is (E).", "E"),
        ("\\boxed{B}", "B"),
        ("\\boxed{(J)}", "J"),
        ("The final answer is A", "A"),
        ("Let me think. It is a hard one.\nAnswer: **F**", "F"),
        ("C", "C"),
        ("no letter here at all", None),
        ("The answer is a number", None),
    ],
)
def test_extract_choice(response, letter):
    assert extract_choice(response) == letter


def test_choice_verifier():
    v = get_verifier("choice")
    r = PromptRecord(id="c", domain="mcq", prompt="q", answer="(B) Paris")
    assert v.verify("Answer: B", r).correct
    out = v.verify("Answer: C", r)
    assert out.status == "fail" and "expected B" in out.reason
    assert v.verify("hmm", r).status == "fail"
    assert v.verify("B", PromptRecord(id="c", domain="mcq", prompt="q", answer="zzz")).status == "error"


@given(st.integers(min_value=-(10**12), max_value=10**12))
def test_integers_match_their_decimal_form(n):
    assert answers_match(str(n), f"{n}.0")
    assert get_verifier("exact").verify(f"Answer: {n}", rec(f"{n}.0")).correct


def test_exact_is_fast_in_process():
    n = 4000
    records = [rec(str(i)) for i in range(n)]
    responses = [f"... so \\boxed{{{i if i % 2 else i + 1}}}" for i in range(n)]
    start = time.perf_counter()
    outs = verify_batch(responses, records)
    elapsed = time.perf_counter() - start
    assert sum(o.correct for o in outs) == n // 2
    assert n / elapsed > 2000, f"{n / elapsed:.0f} verifications/s"
