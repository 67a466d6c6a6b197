"""`uniopd demo` end to end: tiny models for the default suite, the real demo under `-m slow`."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from uniopd.demo.build import TinyModelSpec
from uniopd.demo.run import DEFAULT_STEPS, run_demo

TINY = TinyModelSpec(layers=1, hidden=32, heads=2, sft_steps=3, sft_examples=64, lr=1e-3, batch_size=8)


def test_demo_runs_both_methods_and_writes_a_summary(tmp_path):
    lines: list[str] = []
    res = run_demo(seed=0, out_dir=tmp_path / "demo", steps=2, cache_dir=tmp_path / "cache", progress=False,
                   log=lines.append, teacher_spec=TINY, student_spec=TINY, num_train=32, num_heldout=8,
                   extra=["rollout.prompts_per_step=4", "rollout.n=2"])
    assert set(res["methods"]) == {"opd", "uniopd"}
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["methods"].keys() == res["methods"].keys()
    for method, r in summary["methods"].items():
        assert 0.0 <= r["student_after_acc"] <= 1.0
        rows = [json.loads(x) for x in open(r["metrics_path"])]
        assert [row["step"] for row in rows] == [1, 2]
        assert (tmp_path / "demo" / method / "config.yaml").exists()
    text = "\n".join(lines)
    for label in ("teacher", "student before", "student + opd", "student + uniopd", "summary.json"):
        assert label in text
    # Uni-OPD's switches reach its run and only its run.
    # (order consistency is a diagnostic both log; shifting and balancing are Uni-OPD's).
    first = {m: json.loads(open(r["metrics_path"]).readline()) for m, r in summary["methods"].items()}
    assert {"calib/shifted_group_frac", "balance/kept"} <= first["uniopd"].keys()
    assert not {"calib/shifted_group_frac", "balance/kept"} & first["opd"].keys()
    # Second run reuses both built models.
    run_demo(seed=1, out_dir=tmp_path / "demo2", steps=1, methods=["opd"], cache_dir=tmp_path / "cache",
             progress=False, log=lines.append, teacher_spec=TINY, student_spec=TINY, num_train=32, num_heldout=8,
             extra=["rollout.prompts_per_step=4", "rollout.n=2"])
    assert sum("(cached)" in line for line in lines) == 2


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_the_demo_improves_the_student_with_both_methods(tmp_path, seed):
    """The README's promise: a real held-out gain toward the teacher, for any seed."""
    res = run_demo(seed=seed, out_dir=tmp_path / "demo", progress=False, log=lambda _: None)
    assert res["steps"] == DEFAULT_STEPS
    assert res["teacher_acc"] >= 0.9
    for method, r in res["methods"].items():
        assert r["student_after_acc"] >= res["student_before_acc"] + 0.15, (method, r, res["student_before_acc"])


def test_multi_teacher_demo_routes_each_domain_to_its_expert(tmp_path):
    from uniopd.demo.multi import DOMAINS, run_multi_teacher_demo

    lines: list[str] = []
    experts = {d: replace(TINY, tasks=(d,)) for d in DOMAINS}
    res = run_multi_teacher_demo(out_dir=tmp_path / "multi", steps=2, cache_dir=tmp_path / "cache", progress=False,
                                 log=lines.append, experts=experts, student_spec=replace(TINY, tasks=DOMAINS),
                                 num_train=16, num_heldout=4, extra=["rollout.prompts_per_step=4", "rollout.n=2"])
    assert set(res["accuracy"]) == {"teacher addition", "teacher subtraction", "student before", "student + opd"}
    assert all(set(acc) == {"all", *DOMAINS} for acc in res["accuracy"].values())
    rows = [json.loads(x) for x in open(res["methods"]["opd"]["metrics_path"])]
    # Both teachers scored rollouts in the mixed batches.
    assert all({f"teacher/{d}/teacher_kl" for d in DOMAINS} <= row.keys() for row in rows)
    table = lines[lines.index(next(x for x in lines if x.startswith("held-out accuracy"))):]
    assert "addition" in table[0] and "subtraction" in table[0] and len(table) >= 5


@pytest.mark.slow
def test_the_multi_teacher_demo_improves_the_student_on_both_domains(tmp_path):
    """Two experts, one student: a held-out gain of 15 points or more on each expert's domain."""
    from uniopd.demo.multi import DOMAINS, run_multi_teacher_demo

    acc = run_multi_teacher_demo(out_dir=tmp_path / "multi", progress=False, log=lambda _: None)["accuracy"]
    for d in DOMAINS:
        assert acc[f"teacher {d}"][d] >= 0.9, (d, acc)
        assert acc["student + opd"][d] >= acc["student before"][d] + 0.15, (d, acc)
