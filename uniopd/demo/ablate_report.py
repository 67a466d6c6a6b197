"""Tables and plots of an ablation summary (`uniopd.demo.ablate`).

Markdown: per setting, held-out greedy accuracy per domain, teachers and the untrained
student as reference rows, each method as mean ± sample std over seeds; the teachers'
order-consistency rate on the student's first-step rollouts under each table.
PNGs (one file per kind, one panel per setting): held-out accuracy vs step, order
consistency vs step, mean margin before/after calibration, and the pass-rate histogram
before/after offline balancing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from uniopd.algo.balance_plot import save_figure_png
from uniopd.report import metric_value, read_run

LABELS = {"student": "student (before)", "opd": "OPD", "shift": "OPD + margin shift", "mask": "OPD + margin mask",
          "online": "OPD + online balancing", "offline": "OPD + offline balancing", "uniopd": "Uni-OPD (full)"}
CALIBRATED = ("shift", "mask", "uniopd")
SMOOTH = 10  # steps in the moving average of per-step batch statistics


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); std 0.0 for a single value."""
    n = len(values)
    mean = sum(values) / n
    return mean, (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0


def _pct(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{100 * mean:.1f} %" if len(values) == 1 else f"{100 * mean:.1f} ± {100 * std:.1f} %"


def _columns(domains: list[str]) -> list[str]:
    return domains + ["all"] if len(domains) > 1 else domains


def first_step_consistency(setting: dict[str, Any]) -> list[float]:
    """Order-consistency rates of the first step (before any update), one per seed.

    From the plain-OPD runs when there are any: with the same seed, the first batches of
    opd, shift, mask and online are the same rollouts, so counting them all would count one
    measurement several times."""
    runs = setting["runs"]
    method = "opd" if "opd" in runs else next((m for m in runs if m != "student"), None)
    if method is None:
        return []
    return [first["calib/order_consistency_rate"] for first in (r.get("first_step", {}) for r in runs[method].values())
            if metric_value(first, "calib/order_consistency_rate") is not None]


def ablation_markdown(summary: dict[str, Any]) -> str:
    out = ["# uniopd ablate", ""]
    plan = summary["plan"]
    out.append(f"Seeds {', '.join(map(str, plan['seeds']))}; build seed {plan['build_seed']}; every method gets "
               f"the same budget ({', '.join(plan['budget'])}). Held-out greedy accuracy, mean ± sample std "
               "over seeds.")
    for name, setting in summary["settings"].items():
        cols = _columns(setting["domains"])
        out += ["", f"## {name} ({plan['steps'][name]} steps)", "",
                "| | " + " | ".join(cols) + " | teacher KL, last 10 steps |",
                "|---|" + "---|" * (len(cols) + 1)]
        for domain, acc in setting["teachers"].items():
            out.append(f"| teacher ({domain}) | " + " | ".join(f"{100 * acc[c]:.1f} %" for c in cols) + " | |")
        for method, runs in setting["runs"].items():
            results = list(runs.values())
            kl = [r["final_teacher_kl"] for r in results if "final_teacher_kl" in r]
            kl_text = (f"{mean_std(kl)[0]:.4f}" if kl else "")
            out.append(f"| {LABELS.get(method, method)} | "
                       + " | ".join(_pct([r["acc"][c] for r in results]) for c in cols) + f" | {kl_text} |")
        rates = first_step_consistency(setting)
        if rates:
            mean, std = mean_std(rates)
            out += ["", f"Order consistency of the teacher{'s' if len(setting['domains']) > 1 else ''} on the "
                    f"student's first-step rollouts (share of two-outcome groups with mean margin ≥ δ = 0.4, "
                    f"before any update): {mean:.2f} ± {std:.2f} over {len(rates)} seed(s)."]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- plots


def _metrics(result: dict[str, Any]) -> list[dict[str, Any]]:
    path = Path(result.get("metrics_path", ""))
    return read_run(path.parent)["rows"] if path.is_file() else []


def _mean_curve(results: list[dict[str, Any]], key: str, smooth: int = 1) -> tuple[list[int], list[float]]:
    """Mean of `key` per step over the runs that have a value there (`metric_value`: a margin
    statistic of a step without a two-outcome group has none), then a trailing moving average."""
    per_run = [{row["step"]: v for row in _metrics(r) if (v := metric_value(row, key)) is not None} for r in results]
    steps = sorted(set().union(*per_run))
    ys = [sum(vals) / len(vals) for vals in ([c[s] for c in per_run if s in c] for s in steps)]
    if smooth > 1:
        ys = [sum(ys[max(0, i - smooth + 1): i + 1]) / (i + 1 - max(0, i - smooth + 1)) for i in range(len(ys))]
    return steps, ys


def _figure(n_panels: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0 * n_panels, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, n_panels, i + 1) for i in range(n_panels)]


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:  # a panel can be empty (no calibrated method in the plan)
        ax.legend(fontsize=7)


def _trained(setting: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    return {m: list(r.values()) for m, r in setting["runs"].items() if m != "student"}


def save_plots(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    settings = summary["settings"]
    names = list(settings)
    written = []

    fig, axes = _figure(len(names))
    for ax, name in zip(axes, names):
        s = settings[name]
        before = [r["acc"]["all"] for r in s["runs"].get("student", {}).values()]
        for method, results in _trained(s).items():
            steps, ys = _mean_curve(results, "eval/avg@1")
            if before and steps:
                steps, ys = [0, *steps], [before[0], *ys]
            ax.plot(steps, ys, marker=".", label=LABELS.get(method, method))
        for domain, acc in s["teachers"].items():
            ax.axhline(acc["all"], ls=":", color="grey")
        ax.set(title=f"{name}: held-out accuracy (greedy)", xlabel="step", ylabel="accuracy")
        _legend(ax)
    written.append(save_figure_png(fig, out_dir / "accuracy.png"))

    fig, axes = _figure(len(names))
    for ax, name in zip(axes, names):
        for method, results in _trained(settings[name]).items():
            ax.plot(*_mean_curve(results, "calib/order_consistency_rate", SMOOTH), label=LABELS.get(method, method))
        ax.set(title=f"{name}: order consistency (before calibration)", xlabel="step", ylabel="rate",
               ylim=(-0.02, 1.02))
        _legend(ax)
    written.append(save_figure_png(fig, out_dir / "order_consistency.png"))

    fig, axes = _figure(len(names))
    for ax, name in zip(axes, names):
        for method, results in _trained(settings[name]).items():
            if method not in CALIBRATED:
                continue
            line, = ax.plot(*_mean_curve(results, "calib/mean_margin", SMOOTH), label=f"{method}: before")
            ax.plot(*_mean_curve(results, "calib/mean_margin_after", SMOOTH), ls="--", color=line.get_color(),
                    label=f"{method}: after")
        ax.axhline(0.4, ls=":", color="grey")
        ax.set(title=f"{name}: mean margin before / after calibration", xlabel="step", ylabel="margin")
        _legend(ax)
    written.append(save_figure_png(fig, out_dir / "margins.png"))

    with_balance = [n for n in names if settings[n].get("offline_balance")]
    if with_balance:
        fig, axes = _figure(len(with_balance))
        for ax, name in zip(axes, with_balance):
            seed, bal = next(iter(settings[name]["offline_balance"].items()))
            bins = range(len(bal["hist_before"]))
            ax.bar([b - 0.2 for b in bins], bal["hist_before"], 0.4, label=f"before (n={sum(bal['hist_before'])})")
            ax.bar([b + 0.2 for b in bins], bal["hist_after"], 0.4, label=f"after (n={sum(bal['hist_after'])})")
            ax.set(title=f"{name}: student pass rates, seed {seed}", xlabel="pass-rate bin (0 = hardest)",
                   ylabel="prompts")
            _legend(ax)
        written.append(save_figure_png(fig, out_dir / "pass_rates.png"))
    return written
