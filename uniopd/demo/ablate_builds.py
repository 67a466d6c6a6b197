"""`uniopd ablate --build-seeds 0,1,2`: the grid on several teacher/student builds, read over builds.

On these tasks a method's accuracy moves more between builds (teachers and students trained
from another seed) than between OPD seeds on one build, so a table over OPD seeds alone can
rank methods by luck of the build. Each build's grid runs as usual into OUT/build<k>; this
module reads their summaries and writes, per setting and domain:

    build mean   m_b = mean over OPD seeds of the held-out accuracy on build b
    cell         mean over builds of m_b ± sample std over builds
    Δ vs OPD     d_b = m_b(method) − m_b(OPD), the same build and seeds, so the build's own
                 strength cancels; mean ± std over builds, and on how many builds d_b > 0

`builds.md`, `builds.json` and `plots/builds.png` (each build's mean and the mean over
builds, per method) go to OUT.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from uniopd.algo.balance_plot import save_figure_png
from uniopd.demo.ablate import Ablation, AblationPlan
from uniopd.demo.ablate_report import LABELS, _columns, _figure, _legend, first_step_consistency, mean_std
from uniopd.utils import atomic_write_text


def _cell(values: list[float]) -> dict[str, Any]:
    mean, std = mean_std(values)
    return {"per_build": values, "mean": mean, "std": std}


def over_builds(summaries: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per setting: teacher and method rows as mean ± std over builds of each build's mean over
    OPD seeds, paired differences from plain OPD, and first-step order consistency per build.

    `summaries` maps a build seed to that build's ablation summary (`Ablation.run`). Settings
    and methods are those every build has."""
    builds = sorted(summaries)
    first = summaries[builds[0]]
    out: dict[str, Any] = {"build_seeds": builds, "plan": {k: v for k, v in first["plan"].items() if k != "build_seed"},
                           "settings": {}}
    for name, setting in first["settings"].items():
        per_build = [summaries[b]["settings"].get(name) for b in builds]
        if any(s is None for s in per_build):
            continue
        cols = _columns(setting["domains"])
        rows: dict[str, dict[str, Any]] = {}
        for domain in setting["teachers"]:
            rows[f"teacher:{domain}"] = {c: _cell([s["teachers"][domain][c] for s in per_build]) for c in cols}
        methods = [m for m in setting["runs"] if all(m in s["runs"] for s in per_build)]
        means = {m: {c: [mean_std([r["acc"][c] for r in s["runs"][m].values()])[0] for s in per_build] for c in cols}
                 for m in methods}
        for m in methods:
            rows[m] = {c: _cell(means[m][c]) for c in cols}
        delta: dict[str, dict[str, Any]] = {}
        if "opd" in means:
            for m in methods:
                if m == "opd":
                    continue
                delta[m] = {}
                for c in cols:
                    diffs = [a - b for a, b in zip(means[m][c], means["opd"][c])]
                    delta[m][c] = {**_cell(diffs), "ahead": sum(d > 0 for d in diffs)}
        consistency = [mean_std(rates)[0] if rates else None for rates in map(first_step_consistency, per_build)]
        out["settings"][name] = {"domains": setting["domains"], "columns": cols, "rows": rows, "delta_vs_opd": delta,
                                 "order_consistency": consistency}
    return out


def _pct(cell: dict[str, Any], signed: bool = False) -> str:
    sign = "+" if signed else ""
    if len(cell["per_build"]) == 1:
        return f"{100 * cell['mean']:{sign}.1f} %"
    return f"{100 * cell['mean']:{sign}.1f} ± {100 * cell['std']:.1f} %"


def _label(row: str) -> str:
    return f"teacher ({row.split(':', 1)[1]})" if row.startswith("teacher:") else LABELS.get(row, row)


def builds_markdown(table: dict[str, Any]) -> str:
    builds = table["build_seeds"]
    out = ["# uniopd ablate over builds", "",
           f"Build seeds {', '.join(map(str, builds))}; OPD seeds {', '.join(map(str, table['plan']['seeds']))} on "
           f"each. A cell is the mean over builds of each build's mean over OPD seeds, ± sample std over builds; "
           f"'per build' lists the build means of the last column. 'Δ vs OPD' is the method's build mean minus "
           f"plain OPD's on the same build, mean ± std over builds, with the number of builds where it is above 0."]
    for name, s in table["settings"].items():
        cols, head = s["columns"], s["columns"][-1]
        out += ["", f"## {name} ({table['plan']['steps'][name]} steps, {len(builds)} builds)", "",
                "| | " + " | ".join(cols) + f" | per build ({head}) | Δ vs OPD ({head}) | builds ahead of OPD |",
                "|---|" + "---|" * (len(cols) + 3)]
        for row, cells in s["rows"].items():
            delta = s["delta_vs_opd"].get(row)
            delta_text = (_pct(delta[head], signed=True), f"{delta[head]['ahead']} of {len(builds)}") if delta else ("", "")
            out.append(f"| {_label(row)} | " + " | ".join(_pct(cells[c]) for c in cols) + " | "
                       + " / ".join(f"{100 * v:.1f}" for v in cells[head]["per_build"]) + f" | {delta_text[0]} | "
                       f"{delta_text[1]} |")
        rates = s["order_consistency"]
        if any(r is not None for r in rates):
            out += ["", "Order consistency at the first step (mean over OPD seeds), per build: "
                    + ", ".join(f"build {b}: {'n/a' if r is None else f'{r:.2f}'}" for b, r in zip(builds, rates)) + "."]
    return "\n".join(out) + "\n"


def save_builds_plot(table: dict[str, Any], path: Path) -> Path:
    """One panel per setting: each method's build means (dots) and their mean ± std (bar)."""
    names = list(table["settings"])
    fig, axes = _figure(len(names))
    for ax, name in zip(axes, names):
        s = table["settings"][name]
        head = s["columns"][-1]
        methods = [r for r in s["rows"] if not r.startswith("teacher:")]
        for i, m in enumerate(methods):
            cell = s["rows"][m][head]
            ax.bar(i, cell["mean"], 0.6, yerr=cell["std"], color="lightsteelblue", ecolor="grey", capsize=3)
            ax.plot([i] * len(cell["per_build"]), cell["per_build"], "o", color="black", ms=3,
                    label="one build" if i == 0 else None)
        ax.set_xticks(range(len(methods)), [LABELS.get(m, m).replace("OPD + ", "+ ") for m in methods],
                      rotation=30, ha="right", fontsize=7)
        ax.set(title=f"{name}: held-out accuracy ({head}) over builds", ylabel="accuracy")
        _legend(ax)
    fig.tight_layout()
    return save_figure_png(fig, path)


def run_builds(plan: AblationPlan, build_seeds: list[int], out: Path, *, log=print,
               **ablation_kwargs) -> dict[str, Any]:
    """The plan's grid once per build seed into out/build<k>, then the tables over builds."""
    summaries = {}
    for i, build in enumerate(build_seeds):
        log(f"uniopd ablate: build seed {build} ({i + 1} of {len(build_seeds)}) in {out / f'build{build}'}")
        summaries[build] = Ablation(replace(plan, build_seed=build), out / f"build{build}", log=log,
                                    **ablation_kwargs).run()
    table = over_builds(summaries)
    atomic_write_text(out / "builds.json", json.dumps(table, indent=2) + "\n")
    md = builds_markdown(table)
    atomic_write_text(out / "builds.md", md)
    png = save_builds_plot(table, out / "plots" / "builds.png")
    log("\n" + md)
    log(f"over builds: {out / 'builds.md'}, {out / 'builds.json'}; plot: {png}")
    return table
