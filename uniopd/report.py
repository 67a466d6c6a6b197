"""`uniopd report RUN_DIR [RUN_DIR ...]`: one self-contained HTML page of one or more runs.

The page holds everything it shows (no script, font or data is fetched): for each curve one
inline SVG chart with every run overlaid (loss, teacher KL, accuracy, order consistency,
margins, overlap, entropy gap, time per phase, held-out accuracy), and a table of the config
keys whose values differ between the runs. Curves a run did not log are left out of it;
a chart no run has data for is not drawn.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import yaml

# (metric key, chart title); the order of the page.
CURVES = (
    ("loss", "loss"), ("teacher_kl", "teacher KL (sampled tokens)"), ("acc", "training accuracy"),
    ("eval/avg@1", "held-out accuracy (avg@1)"), ("calib/order_consistency_rate", "order consistency"),
    ("calib/mean_margin", "mean margin m(q)"), ("calib/mean_shift", "mean margin shift"),
    ("advantages/correct_minus_incorrect", "advantage, correct − incorrect"),
    ("diag/topk_overlap", "top-k overlap"), ("diag/entropy_gap", "entropy gap (student − teacher)"),
    ("diag/reverse_kl", "full reverse KL"), ("resp_len", "response length"), ("grad_norm", "gradient norm"),
    ("time/rollout", "seconds: rollout"), ("time/teacher", "seconds: teacher"), ("time/update", "seconds: update"),
)
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
W, H, PAD = 420, 220, 40


def read_run(run_dir: Path) -> dict[str, Any]:
    """{name, rows (metrics.jsonl), config (flattened config.yaml)} of one run directory."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (not a uniopd run directory?)")
    rows = []
    for lineno, line in enumerate(metrics.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{metrics}:{lineno}: invalid JSON: {exc.msg}") from None
    config_path = run_dir / "config.yaml"
    config = _flatten(yaml.safe_load(config_path.read_text()) or {}) if config_path.is_file() else {}
    return {"name": run_dir.name, "rows": rows, "config": config}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."  if isinstance(value, dict) else f"{prefix}{key}"))
    return out


# Defined over the groups that have both a correct and an incorrect rollout. A step with no
# such group logs placeholders (rate 1.0, margin 0.0: nothing to violate), which a curve must
# not draw: a student that stopped answering correctly would read as a teacher back in order.
TWO_OUTCOME_KEYS = frozenset({"calib/order_consistency_rate", "calib/order_consistency_rate_after",
                              "calib/mean_margin", "calib/mean_margin_after"})


def metric_value(row: dict, key: str) -> float | None:
    """The row's value of `key` as a curve reads it: None when absent, not finite, or a
    two-outcome statistic of a step that had no two-outcome group."""
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    if key in TWO_OUTCOME_KEYS and row.get("calib/num_two_outcome_groups") == 0:
        return None
    return float(value)


def _series(rows: list[dict], key: str) -> list[tuple[float, float]]:
    points = []
    for row in rows:
        value = metric_value(row, key)
        if value is not None and isinstance(row.get("step"), (int, float)):
            points.append((float(row["step"]), value))
    return points


def _chart(title: str, key: str, runs: list[dict]) -> str:
    series = [(i, _series(r["rows"], key)) for i, r in enumerate(runs)]
    series = [(i, pts) for i, pts in series if pts]
    xs = [x for _, pts in series for x, _ in pts]
    ys = [y for _, pts in series for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5

    def sx(x: float) -> float:
        return PAD + (x - x0) / (x1 - x0) * (W - 1.5 * PAD)

    def sy(y: float) -> float:
        return H - PAD + (y0 - y) / (y1 - y0) * (H - 1.5 * PAD)

    parts = [f'<svg class="plot" data-key="{html.escape(key)}" width="{W}" height="{H}" viewBox="0 0 {W} {H}">',
             f'<text x="{W / 2}" y="14" text-anchor="middle" class="title">{html.escape(title)}</text>',
             f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD / 2}" y2="{H - PAD}" class="axis"/>',
             f'<line x1="{PAD}" y1="{PAD / 2}" x2="{PAD}" y2="{H - PAD}" class="axis"/>',
             f'<text x="{PAD - 4}" y="{sy(y1) + 4:.1f}" text-anchor="end">{y1:.3g}</text>',
             f'<text x="{PAD - 4}" y="{sy(y0) + 4:.1f}" text-anchor="end">{y0:.3g}</text>',
             f'<text x="{PAD}" y="{H - PAD + 14}" text-anchor="middle">{x0:g}</text>',
             f'<text x="{W - PAD / 2}" y="{H - PAD + 14}" text-anchor="middle">step {x1:g}</text>']
    for i, pts in series:
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        color = COLORS[i % len(COLORS)]
        if len(pts) == 1:
            x, y = pts[0]
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}" data-run="{i}"/>')
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.5" '
                     f'data-run="{i}" data-n="{len(pts)}"/>')
    parts.append("</svg>")
    return "".join(parts)


def _config_diff(runs: list[dict]) -> str:
    keys = sorted({k for r in runs for k in r["config"]})
    differing = [k for k in keys if len({json.dumps(r["config"].get(k), sort_keys=True) for r in runs}) > 1]
    if len(runs) < 2:
        return "<p>One run: no config to compare.</p>"
    if not differing:
        return "<p>The runs' configs are identical.</p>"
    head = "".join(f"<th>{html.escape(r['name'])}</th>" for r in runs)
    body = "".join(f"<tr><td>{html.escape(k)}</td>"
                   + "".join(f"<td>{html.escape(json.dumps(r['config'].get(k)))}</td>" for r in runs) + "</tr>"
                   for k in differing)
    return f'<table class="diff"><tr><th>key</th>{head}</tr>{body}</table>'


STYLE = """body{font-family:sans-serif;margin:20px;color:#222}svg.plot{margin:6px;border:1px solid #ddd}
svg text{font-size:11px}.title{font-size:13px;font-weight:bold}.axis{stroke:#888}
table.diff{border-collapse:collapse}table.diff td,table.diff th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
.legend span{display:inline-block;margin-right:16px}"""


def run_names(run_dirs: list[Path]) -> list[str]:
    """Each run's name for the legend: its directory name, or as many trailing path parts as
    tell it apart from the others (runs/ablate/single/opd/seed0 and .../shift/seed0 read
    opd/seed0 and shift/seed0)."""
    parts = [Path(d).resolve().parts for d in run_dirs]
    for k in range(1, max((len(p) for p in parts), default=1) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return names


def render_report(run_dirs: list[Path]) -> str:
    """The HTML page (a string) for these run directories."""
    runs = [{**read_run(d), "name": name} for d, name in zip(run_dirs, run_names(run_dirs))]
    legend = "".join(f'<span><b style="color:{COLORS[i % len(COLORS)]}">&#9632;</b> {html.escape(r["name"])} '
                     f'({len(r["rows"])} steps)</span>' for i, r in enumerate(runs))
    charts = "".join(_chart(title, key, runs) for key, title in CURVES
                     if any(_series(r["rows"], key) for r in runs))
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>uniopd report</title><style>{STYLE}</style>"
            f"</head><body><h1>uniopd report</h1><p class='legend'>{legend}</p><div>{charts}</div>"
            f"<h2>Config differences</h2>{_config_diff(runs)}</body></html>")
