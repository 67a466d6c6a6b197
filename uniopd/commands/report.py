"""`uniopd report RUN_DIR [RUN_DIR ...] --out report.html`: one self-contained HTML page of
the runs' curves, overlaid, and their config differences (`uniopd.report`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="one self-contained HTML page of runs' curves and config differences")
    p.add_argument("runs", nargs="+", help="run directories (trainer.output_dir of each run)")
    p.add_argument("--out", default="report.html", help="the HTML file to write")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from uniopd.report import render_report
    from uniopd.utils import atomic_write_text

    page = render_report([Path(r) for r in args.runs])
    atomic_write_text(Path(args.out), page)
    print(args.out)
    return 0
