from __future__ import annotations

import pytest

from uniopd.data.records import PromptRecord
from uniopd.rewards import Outcome, get_verifier, known_verifiers, register_verifier, verifier_name_for, verify_batch
from uniopd.rewards import base


@pytest.fixture
def clean_registry():
    saved, saved_inst = dict(base._REGISTRY), dict(base._INSTANCES)
    yield
    base._REGISTRY.clear()
    base._REGISTRY.update(saved)
    base._INSTANCES.clear()
    base._INSTANCES.update(saved_inst)


def rec(rid="r", domain="arithmetic", answer="1", **kw):
    return PromptRecord(id=rid, domain=domain, prompt="q", answer=answer, **kw)


def test_outcome_validation():
    assert Outcome.passed() == Outcome(True, 1.0, "pass", "")
    assert Outcome.timeout().status == "timeout"
    with pytest.raises(ValueError, match="status"):
        Outcome(False, 0.0, "maybe")
    with pytest.raises(ValueError, match="score"):
        Outcome(False, 1.5, "fail")
    with pytest.raises(ValueError, match="correct"):
        Outcome(True, 1.0, "fail")


def test_builtins_registered():
    assert {"exact", "choice", "math", "code"} <= set(known_verifiers())


def test_get_verifier_unknown_lists_known_names():
    with pytest.raises(KeyError) as err:
        get_verifier("nope")
    assert "exact" in str(err.value) and "math" in str(err.value)


def test_register_function_and_class(clean_registry):
    @register_verifier("is_yes")
    def is_yes(response, record):
        return response.strip() == "yes"

    @register_verifier("half")
    class Half:
        def verify(self, response, record):
            return 0.5

    assert get_verifier("is_yes").verify("yes", rec()).correct
    assert get_verifier("is_yes").verify("no", rec()).status == "fail"
    (out,) = verify_batch(["x"], [rec(verifier="half")])  # batch coerces bool/float results
    assert out.score == 0.5 and not out.correct and out.status == "fail"
    assert get_verifier("half") is get_verifier("half")  # instantiated once


def test_verifier_name_for_rules():
    assert verifier_name_for(rec(domain="math")) == "math"
    assert verifier_name_for(rec(domain="arithmetic")) == "exact"
    assert verifier_name_for(rec(domain="code", answer=None, tests=["assert 1"])) == "code"
    assert verifier_name_for(rec(domain="choice")) == "choice"
    assert verifier_name_for(rec(domain="mcq")) == "choice"
    assert verifier_name_for(rec(domain="math", verifier="exact")) == "exact"  # record wins
    assert verifier_name_for(rec(domain="math"), {"math": "exact"}) == "exact"  # then defaults
    assert verifier_name_for(rec(domain="geometry")) == "math"  # has an answer
    assert verifier_name_for(rec(domain="puzzles", answer=None, tests=["assert 1"])) == "code"
    with pytest.raises(ValueError) as err:
        verifier_name_for(rec(rid="id-77", domain="poetry", answer=None))
    assert "id-77" in str(err.value) and "poetry" in str(err.value)


def test_verify_batch_mixed_in_order(clean_registry):
    calls = []

    @register_verifier("upper")
    class Upper:
        def verify(self, response, record):
            calls.append("one")
            return response.isupper()

        def verify_many(self, responses, records, *, timeout_s):
            calls.append(("many", len(responses), timeout_s))
            return [self.verify(r, rec) for r, rec in zip(responses, records)]

    records = [
        rec("a", "arithmetic", "579"),
        rec("b", "mcq", "B"),
        rec("c", "shout", None, verifier="upper"),
        rec("d", "arithmetic", "3"),
        rec("e", "mcq", "C"),
        rec("f", "shout", None, verifier="upper"),
    ]
    responses = ["\\boxed{579.0}", "(B)", "HELLO", "Answer: 4", "Answer: C", "quiet"]
    outs = verify_batch(responses, records, timeout_s=2.5)
    assert [o.correct for o in outs] == [True, True, True, False, True, False]
    assert ("many", 2, 2.5) in calls  # grouped, with the accepted keyword only


def test_verify_batch_errors(clean_registry):
    @register_verifier("boom")
    def boom(response, record):
        raise RuntimeError("kaput")

    outs = verify_batch(["x", "1"], [rec("a", verifier="boom"), rec("b")])
    assert outs[0].status == "error" and "kaput" in outs[0].reason
    assert outs[1].correct
    with pytest.raises(ValueError, match="responses"):
        verify_batch(["x"], [rec(), rec()])
    with pytest.raises(KeyError):
        verify_batch(["x"], [rec(verifier="does-not-exist")])
    with pytest.raises(ValueError, match="poetry"):
        verify_batch(["x"], [rec(domain="poetry", answer=None)])


def test_verify_batch_custom_domain_defaults():
    outs = verify_batch(["Answer: 2"], [rec(domain="quiz", answer="2")], domain_defaults={"quiz": "exact"})
    assert outs[0].correct
