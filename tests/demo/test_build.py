"""The demo's data and model builds: reasoning-gym problems, cached tiny models."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from transformers import LlamaForCausalLM

from uniopd.config import ModelConfig
from uniopd.demo.build import (TEACHER, TinyModelSpec, arithmetic_records, build_model, dropped_carry, heldout_records,
                               mixed_records, noisy_labels, validation_records, validation_score)
from uniopd.models.loading import load_model

TINY = TinyModelSpec(layers=1, hidden=32, heads=2, sft_steps=3, sft_examples=64, lr=1e-3, batch_size=8)


def test_arithmetic_records_are_fixed_width_sums_with_correct_answers():
    recs = arithmetic_records(50, seed=7)
    assert len(recs) == 50 and len({r.id for r in recs}) == 50
    for r in recs:
        expr = r.prompt.removeprefix("Calculate ").removesuffix(".")
        terms = [int(t) for t in expr.split("+")]
        assert len(terms) == 2 and all(10 <= t < 100 for t in terms), r.prompt
        assert r.answer == str(sum(terms)) and r.verifier == "exact" and r.domain == "addition"
    assert [r.prompt for r in arithmetic_records(50, seed=7)] == [r.prompt for r in recs]  # deterministic


def test_subtraction_records_have_non_negative_answers_and_their_own_domain():
    recs = arithmetic_records(40, seed=3, task="subtraction")
    for r in recs:
        a, b = (int(t) for t in r.prompt.removeprefix("Calculate ").removesuffix(".").split(" - "))
        assert 10 <= a < 100 and 10 <= b < 100 and a >= b and r.answer == str(a - b) and r.domain == "subtraction"
    with pytest.raises(ValueError, match="unknown demo task"):
        arithmetic_records(1, seed=0, task="division")


def test_mixed_records_interleave_tasks_and_skip_heldout():
    recs = mixed_records(10, seed=5, tasks=("addition", "subtraction"), prefix="m")
    assert [r.domain for r in recs] == ["addition", "subtraction"] * 5
    heldout = {r.prompt for task in ("addition", "subtraction") for r in heldout_records(task=task)}
    assert not heldout & {r.prompt for r in mixed_records(400, seed=10_000, tasks=("addition", "subtraction"),
                                                          prefix="m")}


def test_training_prompts_never_include_heldout_prompts():
    heldout = {r.prompt for r in heldout_records()}
    assert len(heldout) > 250  # 2-digit sums repeat rarely; a small set would make the check vacuous
    train = arithmetic_records(2000, seed=1_000_000, exclude=heldout)
    assert not heldout & {r.prompt for r in train}


def test_build_model_caches_and_loads_as_an_ordinary_hf_model(tmp_path):
    logs: list[str] = []
    path, cached = build_model("student", TINY, tmp_path, progress=False, log=logs.append)
    assert not cached and logs and (path / "built.ok").exists()
    again, cached = build_model("student", TINY, tmp_path, progress=False, log=logs.append)
    assert cached and again == path and len(logs) == 1  # the second call built nothing
    loaded = load_model(ModelConfig(path=str(path), chat_template=False), trainable=False)
    assert isinstance(loaded.model, LlamaForCausalLM)
    assert loaded.model.config.num_hidden_layers == 1 and loaded.model.config.hidden_size == 32
    assert loaded.tokenizer.decode(loaded.tokenizer("12+34")["input_ids"], skip_special_tokens=True) == "12+34"


def test_a_changed_recipe_or_an_interrupted_build_is_rebuilt(tmp_path):
    path, _ = build_model("teacher", TINY, tmp_path, progress=False, log=lambda _: None)
    other, cached = build_model("teacher", replace(TINY, sft_steps=4), tmp_path, progress=False, log=lambda _: None)
    assert other != path and not cached
    (path / "built.ok").unlink()  # as if killed before the build finished
    rebuilt, cached = build_model("teacher", TINY, tmp_path, progress=False, log=lambda _: None)
    assert rebuilt == path and not cached and (path / "built.ok").exists()


def test_a_build_stops_at_its_validation_target_and_records_where(tmp_path):
    logs: list[str] = []
    # Any accuracy meets a target of 0: the build stops at its first evaluation.
    path, _ = build_model("student", replace(TINY, sft_steps=9, target_acc=0.0, eval_every=2), tmp_path,
                          progress=False, log=logs.append)
    built = json.loads((path / "built.ok").read_text())
    assert built["sft_steps"] == 2 and built["validation"]["step"] == 2
    assert 0.0 <= built["validation"]["all"] <= 1.0 and "addition" in built["validation"]
    assert "reached validation accuracy 0% after 2 SFT steps" in logs[-1]
    # A random 1-layer model never answers a sum right: it trains all its steps and says so.
    path, _ = build_model("student", replace(TINY, sft_steps=5, target_acc=1.0, eval_every=2), tmp_path,
                          progress=False, log=logs.append)
    built = json.loads((path / "built.ok").read_text())
    assert built["sft_steps"] == 5 and built["validation"]["step"] == 4
    assert "did not reach validation accuracy 100% after 5 SFT steps" in logs[-1]


def test_a_mixed_build_can_require_its_target_on_every_task():
    spec = replace(TinyModelSpec(layers=1, hidden=32, heads=2, sft_steps=3, sft_examples=64, lr=1e-3),
                   tasks=("addition", "subtraction"), target_acc=0.2)
    acc = {"all": 0.25, "addition": 0.13, "subtraction": 0.37}
    assert validation_score(acc, spec) == 0.25  # the mix passes 20 %...
    assert validation_score(acc, replace(spec, each_task=True)) == 0.13  # ...its weaker task does not
    assert replace(spec, each_task=True).key("student") != spec.key("student")


def test_validation_prompts_are_not_held_out():
    val = validation_records(("addition", "subtraction"))
    held = {r.prompt for task in ("addition", "subtraction") for r in heldout_records(task=task)}
    assert len(val) == 200 and {r.domain for r in val} == {"addition", "subtraction"}
    assert not held & {r.prompt for r in val}


def test_noisy_labels_drop_the_carry_in_a_share_of_the_carry_problems():
    records = arithmetic_records(400, seed=7) + arithmetic_records(100, seed=7, task="subtraction")
    noisy = noisy_labels(records, 0.5, seed=0)
    carry = [r for r in records if dropped_carry(r) is not None]
    moved = [(a, b) for a, b in zip(records, noisy) if a.answer != b.answer]
    assert 0.4 < len(moved) / len(carry) < 0.6 and len(carry) > 100
    for old, new in moved:
        x, op, y = old.prompt.removeprefix("Calculate ").rstrip(".").split()
        x, y = int(x), int(y)
        # by hand: the ones digits carry (or borrow), and the new answer is off by exactly that ten
        assert (x % 10 + y % 10 >= 10 and int(new.answer) == x + y - 10) if op == "+" else \
            (x % 10 < y % 10 and int(new.answer) == x - y + 10)
    assert [r.prompt for r in noisy] == [r.prompt for r in records]
    assert noisy_labels(records, 0.0, seed=0) is records
    assert dropped_carry(replace(records[0], prompt="Calculate 57 + 25.")) == "72"
    assert dropped_carry(replace(records[0], prompt="Calculate 52 - 17.")) == "45"
    assert dropped_carry(replace(records[0], prompt="Calculate 52 + 17.")) is None
    # A clean spec keeps the cache key it had before the field existed (the demo teacher's key
    # computed by the code before it); a noisy one gets its own.
    assert TEACHER.key("teacher") == "teacher-4243376e900b"
    assert replace(TEACHER, label_noise=0.1).key("teacher") != TEACHER.key("teacher")
