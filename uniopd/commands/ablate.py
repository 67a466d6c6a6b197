"""`uniopd ablate`: each part of the Uni-OPD recipe on the demo's tasks, over seeds."""

from __future__ import annotations

import argparse
from pathlib import Path


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None


def add_parser(sub) -> None:
    p = sub.add_parser("ablate", help="ablation of the Uni-OPD recipe on the offline demo tasks (tables + plots)")
    # Names only here: the ablation module loads torch and transformers, which every other
    # command's --help would then pay for. `run` checks them against the module's tables.
    p.add_argument("--settings", default="single,multi,neighbour",
                   help="comma list of: single, multi, neighbour, noisy (default: the first three)")
    p.add_argument("--methods", default="student,opd,shift,mask,online,offline,uniopd",
                   help="comma list of: student, opd, shift, mask, online, offline, uniopd")
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="OPD seeds (default: 0,1,2)")
    p.add_argument("--build-seeds", "--build-seed", dest="build_seeds", type=_ints, default=[0],
                   help="seed(s) of the teacher and student builds (default 0: the demo's models); several, "
                        "e.g. 0,1,2, run the grid on each build into OUT/build<k> and write OUT/builds.md, "
                        "mean ± std over builds")
    p.add_argument("--steps", type=int, default=None, help="OPD steps per run (default: each setting's)")
    p.add_argument("--out", default="runs/ablate", help="results directory; running again resumes it")
    p.add_argument("--cache-dir", default=None, help="where built models are cached ($UNIOPD_CACHE)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from uniopd.demo.ablate import SETTINGS, Ablation, AblationError, AblationPlan
    from uniopd.demo.ablate_builds import run_builds

    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"uniopd ablate: error: unknown setting(s) {unknown} (choose from {', '.join(SETTINGS)})")
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"uniopd ablate: error: --steps must be >= 1, got {args.steps}")
    builds = args.build_seeds
    if not builds or len(set(builds)) != len(builds) or min(builds) < 0:
        raise SystemExit(f"uniopd ablate: error: --build-seeds must be distinct integers >= 0, got {builds}")
    try:
        plan = AblationPlan({n: SETTINGS[n] for n in names}, [m.strip() for m in args.methods.split(",") if m.strip()],
                            args.seeds, build_seed=builds[0], steps=args.steps)
        kwargs = {"cache_dir": Path(args.cache_dir) if args.cache_dir else None, "progress": not args.no_progress}
        if len(builds) == 1:
            Ablation(plan, Path(args.out), **kwargs).run()
        else:
            run_builds(plan, builds, Path(args.out), **kwargs)
    except AblationError as exc:
        raise SystemExit(f"uniopd ablate: error: {exc}") from None
    return 0
