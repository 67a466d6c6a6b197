"""`uniopd report`: the page holds the runs' curves (checked by value) and their config differences."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from helpers import tiny_run_config

from uniopd.cli import main
from uniopd.report import CURVES
from uniopd.train.trainer import Trainer


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_student_dir, tiny_teacher_dir):
    from helpers import write_jsonl

    root = tmp_path_factory.mktemp("report")
    data = write_jsonl(root / "train.jsonl", [{"id": f"p{i}", "domain": "arithmetic", "prompt": f"{i}+{i}=",
                                               "answer": str(2 * i), "verifier": "exact"} for i in range(8)])
    runs = []
    for name, extra in (("opd", {}), ("uniopd", {"calibration.enabled": "true"})):
        cfg = tiny_run_config(tiny_student_dir, tiny_teacher_dir, data, root / name,
                              **{"trainer.steps": 3, "trainer.save_every": 0, **extra})
        Trainer(cfg).train()
        runs.append(root / name)
    return runs


def _polylines(page: str) -> dict[str, list[list[tuple[float, float]]]]:
    out = {}
    for key, body in re.findall(r'<svg class="plot" data-key="([^"]+)"[^>]*>(.*?)</svg>', page):
        out[key] = [[tuple(map(float, p.split(","))) for p in pts.split()]
                    for pts in re.findall(r'<polyline points="([^"]+)"', body)]
    return out


def test_the_page_overlays_every_runs_curves_and_diffs_their_configs(two_runs, tmp_path):
    out = tmp_path / "report.html"
    assert main(["report", *map(str, two_runs), "--out", str(out)]) == 0
    page = out.read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page  # nothing to fetch
    lines = _polylines(page)
    for key in ("loss", "teacher_kl", "acc", "diag/topk_overlap", "time/update"):
        assert len(lines[key]) == 2 and all(len(pts) == 3 for pts in lines[key]), key
    # Order consistency is drawn at the steps that had a group with both outcomes, and only there.
    rows = [[json.loads(line) for line in open(run / "metrics.jsonl")] for run in two_runs]
    with_two = [sum(r["calib/num_two_outcome_groups"] > 0 for r in run_rows) for run_rows in rows]
    assert [len(pts) for pts in lines.get("calib/order_consistency_rate", [])] == [n for n in with_two if n]
    # The plotted shape is the logged data: the loss chart's y order follows the loss values.
    losses = [json.loads(line)["loss"] for line in open(two_runs[0] / "metrics.jsonl")]
    ys = [y for _, y in lines["loss"][0]]
    assert sorted(range(3), key=lambda i: -ys[i]) == sorted(range(3), key=lambda i: losses[i])
    assert all(key in dict(CURVES) for key in lines)
    assert "<td>calibration.enabled</td><td>false</td><td>true</td>" in page


def test_a_directory_without_metrics_is_refused(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


@pytest.mark.slow
def test_the_page_renders_in_headless_chromium_without_console_errors(two_runs, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium package is not installed")
    out = tmp_path / "report.html"
    assert main(["report", *map(str, two_runs), "--out", str(out)]) == 0
    done = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr",
                           "--v=0", "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "CONSOLE" not in done.stderr or "ERROR" not in done.stderr
    rendered = _polylines(done.stdout)
    assert rendered == _polylines(out.read_text())  # every chart made it into the rendered page
    assert all(runs and all(len(p) == 3 for p in runs) for runs in rendered.values())
    assert all(len(rendered[key]) == 2 for key in ("loss", "teacher_kl", "diag/topk_overlap"))


def test_margin_statistics_of_steps_without_a_two_outcome_group_are_not_drawn(tmp_path):
    from uniopd.report import metric_value, render_report

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 1, "loss": 0.5, "calib/num_two_outcome_groups": 2, "calib/order_consistency_rate": 0.5,
             "calib/mean_margin": 0.1},
            # No group with both outcomes: the logged 1.0 and 0.0 are placeholders.
            {"step": 2, "loss": 0.4, "calib/num_two_outcome_groups": 0, "calib/order_consistency_rate": 1.0,
             "calib/mean_margin": 0.0},
            {"step": 3, "loss": 0.3, "calib/num_two_outcome_groups": 1, "calib/order_consistency_rate": 0.0,
             "calib/mean_margin": -0.2}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert metric_value(rows[1], "calib/order_consistency_rate") is None
    assert metric_value(rows[1], "loss") == 0.4 and metric_value({"loss": float("nan")}, "loss") is None
    lines = _polylines(render_report([run]))
    assert [len(pts) for pts in lines["loss"]] == [3]
    # Steps 1 and 3 only: the two-point line runs from the top of the chart (0.5) to its bottom (0.0).
    (x1, y1), (x3, y3) = lines["calib/order_consistency_rate"][0]
    assert x1 < x3 and y1 < y3 and len(lines["calib/mean_margin"][0]) == 2


def test_runs_with_the_same_directory_name_are_told_apart_by_their_parents(tmp_path):
    from uniopd.report import run_names

    dirs = [tmp_path / "ablate" / m / "seed0" for m in ("opd", "shift")] + [tmp_path / "other" / "run"]
    assert run_names(dirs) == ["opd/seed0", "shift/seed0", "other/run"]
    assert run_names([tmp_path / "a", tmp_path / "b"]) == ["a", "b"]
