"""`uniopd train`: OPD training from a recipe."""

from __future__ import annotations

import argparse
import json
import sys

from uniopd.commands.common import add_config_args
from uniopd.config import load_config


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="run OPD training from a recipe")
    add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint")
    p.add_argument("--skip-invalid", action="store_true", help="skip and count invalid prompt records")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from uniopd.train.trainer import Trainer

    overrides = list(args.overrides) + (["data.skip_invalid=true"] if args.skip_invalid else [])
    cfg = load_config(args.config, overrides)
    trainer = Trainer(cfg)
    if args.resume:
        if not trainer.resume():
            print(f"uniopd: --resume: no checkpoint in {cfg.trainer.output_dir}; starting fresh", file=sys.stderr)
    result = trainer.train()
    print(json.dumps({k: v for k, v in result.items() if k != "metrics"}))
    return 0 if result["stopped_by_signal"] is None else 128 + int(result["stopped_by_signal"])
