"""`uniopd demo`: build a teacher and a student offline, distil, compare."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="offline demo: build a teacher and a student, distil, compare")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="OPD steps per method (default: the demo's)")
    p.add_argument("--methods", help="comma list of: opd, uniopd (default: both; opd with --multi-teacher)")
    p.add_argument("--multi-teacher", action="store_true",
                   help="two domains (addition, subtraction), one expert teacher each, one student")
    p.add_argument("--out", help="directory for the runs and their metrics (default: runs/demo[_multi])")
    p.add_argument("--cache-dir", default=None, help="where built models are cached ($UNIOPD_CACHE)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    common = dict(seed=args.seed, steps=args.steps, cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                  progress=not args.no_progress)
    if args.multi_teacher:
        from uniopd.demo.multi import run_multi_teacher_demo

        run_multi_teacher_demo(out_dir=Path(args.out or "runs/demo_multi"),
                               methods=(args.methods or "opd").split(","), **common)
    else:
        from uniopd.demo.run import run_demo

        run_demo(out_dir=Path(args.out or "runs/demo"), methods=(args.methods or "opd,uniopd").split(","), **common)
    return 0
