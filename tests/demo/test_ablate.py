"""`uniopd ablate`: the grid on tiny models, resuming, the tables against hand-computed values."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from uniopd.cli import main
from uniopd.demo.ablate import METHODS, SETTINGS, Ablation, AblationError, AblationPlan, Setting
from uniopd.demo.ablate_report import ablation_markdown, first_step_consistency, mean_std
from uniopd.demo.build import TinyModelSpec

TINY = TinyModelSpec(layers=1, hidden=32, heads=2, sft_steps=3, sft_examples=64, lr=1e-3, batch_size=8)
TINY_EXTRA = ("rollout.prompts_per_step=4", "rollout.n=2", "trainer.eval_every=1", "balance.offline_k=2")


def test_mean_and_sample_std_by_hand():
    assert mean_std([0.5, 0.7, 0.9]) == pytest.approx((0.7, 0.2))  # deviations ±0.2, 0: sqrt(0.08 / 2)
    assert mean_std([0.25]) == (0.25, 0.0)


def test_the_markdown_table_by_hand():
    summary = {
        "plan": {"seeds": [0, 1], "build_seed": 0, "steps": {"multi": 5}, "budget": ["rollout.n=8"]},
        "settings": {"multi": {
            "domains": ["addition", "subtraction"],
            "teachers": {"addition": {"all": 0.5, "addition": 1.0, "subtraction": 0.0}},
            "runs": {
                "student": {"0": {"acc": {"all": 0.2, "addition": 0.3, "subtraction": 0.1}},
                            "1": {"acc": {"all": 0.2, "addition": 0.3, "subtraction": 0.1}}},
                "opd": {"0": {"acc": {"all": 0.4, "addition": 0.5, "subtraction": 0.3}, "final_teacher_kl": 0.1,
                              "first_step": {"calib/order_consistency_rate": 0.25}},
                        "1": {"acc": {"all": 0.6, "addition": 0.7, "subtraction": 0.5}, "final_teacher_kl": 0.3,
                              "first_step": {"calib/order_consistency_rate": 0.75}}},
            },
        }},
    }
    md = ablation_markdown(summary)
    assert "| | addition | subtraction | all | teacher KL, last 10 steps |" in md
    assert "| teacher (addition) | 100.0 % | 0.0 % | 50.0 % | |" in md
    assert "| student (before) | 30.0 ± 0.0 % | 10.0 ± 0.0 % | 20.0 ± 0.0 % |  |" in md
    # 0.5 and 0.7: mean 0.6, sample std sqrt(2 * 0.01 / 1) = 0.1414
    assert "| OPD | 60.0 ± 14.1 % | 40.0 ± 14.1 % | 50.0 ± 14.1 % | 0.2000 |" in md
    assert first_step_consistency(summary["settings"]["multi"]) == [0.25, 0.75]
    assert "0.50 ± 0.35 over 2 seed(s)" in md


def test_unknown_names_are_refused(capsys):
    with pytest.raises(AblationError, match=r"unknown ablation method\(s\) \['best'\]"):
        AblationPlan({"single": SETTINGS["single"]}, ["opd", "best"], [0])
    for argv, message in ((["--settings", "single,huge"], "unknown setting(s) ['huge']"),
                          (["--methods", "opd,best"], "unknown ablation method(s) ['best']"),
                          (["--seeds", "0,x"], "expected a comma list of integers")):
        with pytest.raises(SystemExit) as exc:
            main(["ablate", *argv])
        assert message in str(exc.value) + capsys.readouterr().err


def test_the_grid_runs_resumes_and_reports(tmp_path):
    setting = Setting((("addition", TINY),), TINY, steps=2, num_heldout=8)
    plan = AblationPlan({"single": setting}, list(METHODS), [0, 1], num_train=32, extra=TINY_EXTRA)
    lines: list[str] = []
    out = tmp_path / "ablate"
    summary = Ablation(plan, out, cache_dir=tmp_path / "cache", progress=False, log=lines.append).run()
    runs = summary["settings"]["single"]["runs"]
    assert set(runs) == set(METHODS) and all(set(r) == {"0", "1"} for r in runs.values())
    assert "13 training run(s)" not in lines[0] and "12 training run(s) to do" in lines[0]
    assert lines[1].startswith("2 model(s) not in ") and TINY.key("teacher") in lines[1]
    assert sum(line.startswith("[") for line in lines) == 14
    # Each method's switches reach its runs and only its runs.
    first = {m: json.loads(open(runs[m]["0"]["metrics_path"]).readline()) for m in runs if m != "student"}
    assert "calib/shifted_group_frac" in first["shift"] and "calib/shifted_group_frac" not in first["opd"]
    assert "calib/masked_group_frac" in first["mask"] and "calib/mean_margin_after" in first["mask"]
    assert "balance/kept" in first["online"] and "balance/kept" not in first["offline"]
    assert runs["offline"]["0"]["train_file"].endswith("_balanced.jsonl")
    assert runs["opd"]["0"]["train_file"].endswith("train_seed0.jsonl")
    # Greedy eval every step gives the accuracy curve.
    rows = [json.loads(x) for x in open(runs["opd"]["1"]["metrics_path"])]
    assert [r["step"] for r in rows if "eval/avg@1" in r] == [1, 2]
    # The table's OPD cell is the mean ± std of the two runs' results.
    mean, std = mean_std([runs["opd"][s]["acc"]["addition"] for s in ("0", "1")])
    md = (out / "ablation.md").read_text()
    assert f"| OPD | {100 * mean:.1f} ± {100 * std:.1f} % |" in md
    for png in ("accuracy", "order_consistency", "margins", "pass_rates"):
        assert (out / "plots" / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "ablation.json").read_text())["settings"]["single"]["offline_balance"]["0"]["prompts"]
    # One HTML report per setting: seed 0 of each trained method, named by method, with the
    # config keys that tell the methods apart.
    page = (out / "single" / "report.html").read_text()
    loss_chart = re.search(r'<svg class="plot" data-key="loss"[^>]*>(.*?)</svg>', page)[1]
    assert loss_chart.count("<polyline") == len(METHODS) - 1
    assert all(f"{m}/seed0 (2 steps)" in page for m in METHODS if m != "student") and "seed1" not in page
    assert "<td>calibration.enabled</td>" in page and "<td>balance.online</td>" in page

    # Run again: nothing to train. Then lose one run's result (as if killed after its last
    # checkpoint): only that run is redone, from its checkpoint.
    lines.clear()
    Ablation(plan, out, cache_dir=tmp_path / "cache", progress=False, log=lines.append).run()
    assert "0 training run(s) to do" in lines[0] and not any("not in " in line for line in lines)
    (out / "single" / "shift" / "seed1" / "result.json").unlink()
    lines.clear()
    again = Ablation(plan, out, cache_dir=tmp_path / "cache", progress=False, log=lines.append).run()
    assert "1 training run(s) to do" in lines[0]
    assert any("single shift seed 1: resumed at step 2" in line for line in lines)
    assert again["settings"]["single"]["runs"]["shift"]["1"]["acc"] == runs["shift"]["1"]["acc"]
    # A results directory moved elsewhere still draws its runs' curves, from their new place.
    moved = tmp_path / "moved"
    out.rename(moved)
    again = Ablation(plan, moved, cache_dir=tmp_path / "cache", progress=False, log=lines.append).run()
    metrics = moved / "single" / "opd" / "seed1" / "metrics.jsonl"
    assert again["settings"]["single"]["runs"]["opd"]["1"]["metrics_path"] == str(metrics) and metrics.is_file()
    out = moved
    # Another budget in the same directory would mix results that are not comparable.
    with pytest.raises(ValueError, match=r"another budget \(steps: None there, 3 now\); use another --out"):
        Ablation(replace(plan, steps=3), out, cache_dir=tmp_path / "cache", progress=False, log=lines.append).run()


def test_the_noisy_setting_is_the_clean_teacher_with_noisy_labels():
    clean, noisy = SETTINGS["single"].teachers[0][1], SETTINGS["noisy"].teachers[0][1]
    assert replace(noisy, label_noise=0.0, target_acc=clean.target_acc) == clean
    assert noisy.key("teacher") != clean.key("teacher")


def test_a_signal_stops_the_grid_without_a_result_and_the_next_call_resumes(tmp_path, monkeypatch):
    import os
    import signal

    from uniopd.train.trainer import Trainer

    setting = Setting((("addition", TINY),), TINY, steps=3, num_heldout=8)
    plan = AblationPlan({"single": setting}, ["opd"], [0], num_train=32,
                        extra=(*TINY_EXTRA, "trainer.save_every=1"))
    step = Trainer.step

    def step_then_sigterm(self):
        out = step(self)
        if self.step_idx == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill` from a shell would, mid-run
        return out

    monkeypatch.setattr(Trainer, "step", step_then_sigterm)
    lines: list[str] = []
    with pytest.raises(SystemExit) as exc:
        Ablation(plan, tmp_path / "a", cache_dir=tmp_path / "cache", progress=False, log=lines.append).run()
    assert exc.value.code == 128 + signal.SIGTERM
    assert "stopped by signal 15 at step 2" in lines[-1]
    assert not (tmp_path / "a" / "single" / "opd" / "seed0" / "result.json").exists()
    monkeypatch.setattr(Trainer, "step", step)
    lines.clear()
    summary = Ablation(plan, tmp_path / "a", cache_dir=tmp_path / "cache", progress=False, log=lines.append).run()
    assert any("resumed at step 2" in line for line in lines)
    assert summary["settings"]["single"]["runs"]["opd"]["0"]["steps"] == 3


def test_the_command_defaults_are_the_modules_tables():
    from uniopd.cli import build_parser
    from uniopd.demo.ablate import DEFAULT_SETTINGS

    args = build_parser().parse_args(["ablate"])
    assert args.settings.split(",") == list(DEFAULT_SETTINGS) and set(DEFAULT_SETTINGS) <= set(SETTINGS)
    assert args.methods.split(",") == list(METHODS) and args.seeds == [0, 1, 2]
    # The neighbour setting's teacher is the subtraction expert, routed the addition records.
    assert SETTINGS["neighbour"].teachers[0][0] == "addition"
    assert SETTINGS["neighbour"].teachers[0][1].tasks == ("subtraction",)


def test_steps_without_a_two_outcome_group_are_left_out_of_consistency(tmp_path):
    from uniopd.demo.ablate_report import _mean_curve

    runs = []
    for i, rates in enumerate(([0.5, None, 1.0], [0.25, 0.75, None])):  # None: no two-outcome group
        run = tmp_path / f"seed{i}"
        run.mkdir()
        rows = [{"step": s + 1, "calib/num_two_outcome_groups": 0 if r is None else 3,
                 "calib/order_consistency_rate": 1.0 if r is None else r} for s, r in enumerate(rates)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append({"metrics_path": str(run / "metrics.jsonl"), "first_step": rows[0] if i else {
            "calib/num_two_outcome_groups": 0.0, "calib/order_consistency_rate": 1.0}})
    # Step 1: (0.5 + 0.25) / 2; step 2: seed 1 alone; step 3: seed 0 alone.
    steps, ys = _mean_curve(runs, "calib/order_consistency_rate")
    assert steps == [1, 2, 3] and ys == pytest.approx([0.375, 0.75, 1.0])
    assert _mean_curve(runs, "calib/order_consistency_rate", smooth=2)[1] == pytest.approx([0.375, 0.5625, 0.875])
    # Seed 0's first step had no group with both outcomes: its 1.0 is no measurement.
    assert first_step_consistency({"runs": {"opd": {"0": runs[0], "1": runs[1]}}}) == [0.25]
