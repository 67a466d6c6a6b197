"""`uniopd ablate --build-seeds`: the tables over builds against hand-computed values, and a tiny run."""

from __future__ import annotations

import json

import pytest

from uniopd.cli import main
from uniopd.demo.ablate import AblationPlan, Setting
from uniopd.demo.ablate_builds import builds_markdown, over_builds, run_builds
from uniopd.demo.ablate_report import mean_std

from demo.test_ablate import TINY, TINY_EXTRA


def _summary(teacher: float, student: float, opd: list[float], shift: list[float], rates: list[float]):
    def run(acc, rate=None):
        return {"acc": {"all": acc, "addition": acc}, **({"first_step": {"calib/order_consistency_rate": rate}}
                                                         if rate is not None else {})}

    return {"plan": {"seeds": [0, 1], "build_seed": 0, "steps": {"single": 5}, "budget": []},
            "settings": {"single": {
                "domains": ["addition"], "teachers": {"addition": {"all": teacher, "addition": teacher}},
                "runs": {"student": {"0": run(student), "1": run(student)},
                         "opd": {str(i): run(a, r) for i, (a, r) in enumerate(zip(opd, rates))},
                         "shift": {str(i): run(a) for i, a in enumerate(shift)}}}}}


def test_over_builds_by_hand():
    # Build 0: OPD seeds 0.5, 0.7 (mean 0.6), shift 0.6, 0.6 (0.6). Build 1: OPD 0.2, 0.4 (0.3),
    # shift 0.5, 0.3 (0.4). Build means of OPD: 0.6, 0.3 -> 0.45 ± 0.2121 (sqrt(2 * 0.15^2 / 1)).
    # Shift minus OPD per build: 0.0, +0.1 -> +0.05 ± 0.0707, ahead of OPD on 1 build (0.0 is not ahead).
    table = over_builds({0: _summary(0.99, 0.3, [0.5, 0.7], [0.6, 0.6], [1.0, 0.5]),
                         1: _summary(0.97, 0.2, [0.2, 0.4], [0.5, 0.3], [0.25, 0.25])})
    s = table["settings"]["single"]
    assert table["build_seeds"] == [0, 1] and s["columns"] == ["addition"]
    assert s["rows"]["teacher:addition"]["addition"]["mean"] == pytest.approx(0.98)
    assert s["rows"]["student"]["addition"]["per_build"] == pytest.approx([0.3, 0.2])
    opd = s["rows"]["opd"]["addition"]
    assert opd["per_build"] == pytest.approx([0.6, 0.3])
    assert (opd["mean"], opd["std"]) == pytest.approx((0.45, 0.15 * 2 ** 0.5))
    delta = s["delta_vs_opd"]["shift"]["addition"]
    assert delta["per_build"] == pytest.approx([0.0, 0.1])
    assert (delta["mean"], delta["std"], delta["ahead"]) == pytest.approx((0.05, 0.05 * 2 ** 0.5, 1))
    assert "opd" not in s["delta_vs_opd"] and s["delta_vs_opd"]["student"]["addition"]["ahead"] == 0
    assert s["order_consistency"] == pytest.approx([0.75, 0.25])

    md = builds_markdown(table)
    assert "| | addition | per build (addition) | Δ vs OPD (addition) | builds ahead of OPD |" in md
    assert "| teacher (addition) | 98.0 ± 1.4 % | 99.0 / 97.0 |  |  |" in md
    assert "| OPD | 45.0 ± 21.2 % | 60.0 / 30.0 |  |  |" in md
    assert "| OPD + margin shift | 50.0 ± 14.1 % | 60.0 / 40.0 | +5.0 ± 7.1 % | 1 of 2 |" in md
    assert "build 0: 0.75, build 1: 0.25" in md


def test_a_setting_missing_from_one_build_is_left_out():
    one = _summary(0.9, 0.2, [0.5, 0.5], [0.5, 0.5], [1.0, 1.0])
    other = _summary(0.9, 0.2, [0.5, 0.5], [0.5, 0.5], [1.0, 1.0])
    other["settings"] = {"multi": other["settings"]["single"]}
    assert over_builds({0: one, 1: other})["settings"] == {}


def test_build_seeds_are_checked_on_the_command_line(capsys):
    for value in ("1,1", "-1", ""):
        with pytest.raises(SystemExit) as exc:
            main(["ablate", "--build-seeds", value])
        assert "--build-seeds must be distinct integers >= 0" in str(exc.value) + capsys.readouterr().err
    from uniopd.cli import build_parser

    assert build_parser().parse_args(["ablate", "--build-seed", "2"]).build_seeds == [2]


def test_two_builds_run_into_their_own_directories_and_the_table_reads_them(tmp_path):
    setting = Setting((("addition", TINY),), TINY, steps=2, num_heldout=8)
    plan = AblationPlan({"single": setting}, ["student", "opd", "shift"], [0, 1], num_train=32, extra=TINY_EXTRA)
    lines: list[str] = []
    out = tmp_path / "ablate"
    table = run_builds(plan, [0, 3], out, cache_dir=tmp_path / "cache", progress=False, log=lines.append)
    assert any("build seed 3 (2 of 2)" in line for line in lines)
    per_build = [json.loads((out / f"build{b}" / "ablation.json").read_text()) for b in (0, 3)]
    assert [s["plan"]["build_seed"] for s in per_build] == [0, 3]
    # Another build seed is another model: its student is not build 0's.
    students = [s["settings"]["single"]["runs"]["student"]["0"]["acc"]["addition"] for s in per_build]
    refs = [json.loads((out / f"build{b}" / "single" / "references.json").read_text())["paths"] for b in (0, 3)]
    assert refs[0] != refs[1]
    opd_means = [mean_std([r["acc"]["addition"] for r in s["settings"]["single"]["runs"]["opd"].values()])[0]
                 for s in per_build]
    cell = table["settings"]["single"]["rows"]["opd"]["addition"]
    assert cell["per_build"] == pytest.approx(opd_means)
    assert table["settings"]["single"]["rows"]["student"]["addition"]["per_build"] == pytest.approx(students)
    mean, std = mean_std(opd_means)
    md = (out / "builds.md").read_text()
    assert f"| OPD | {100 * mean:.1f} ± {100 * std:.1f} % |" in md
    assert json.loads((out / "builds.json").read_text())["build_seeds"] == [0, 3]
    assert (out / "plots" / "builds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Running again trains nothing: each build's grid resumes from its own results.
    lines.clear()
    run_builds(plan, [0, 3], out, cache_dir=tmp_path / "cache", progress=False, log=lines.append)
    assert sum("0 training run(s) to do" in line for line in lines) == 2
