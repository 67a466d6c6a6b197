"""`uniopd train`: OPD training from a recipe."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys

from uniopd.commands.common import add_config_args
from uniopd.config import ConfigError, load_config


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="run OPD training from a recipe")
    add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint")
    p.add_argument("--skip-invalid", action="store_true", help="skip and count invalid prompt records")
    p.add_argument("--nproc", type=int, default=1,
                   help="data-parallel processes on this machine (torchrun; sets trainer.strategy=data_parallel)")
    p.set_defaults(run=run)


def _launch(args: argparse.Namespace) -> int:
    """Re-run this command under torchrun with N processes on this machine."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
            "-m", "uniopd", "train"] + (["--config", args.config] if args.config else [])
    argv += ["--resume"] * args.resume + ["--skip-invalid"] * args.skip_invalid
    argv += list(args.overrides) + ["trainer.strategy=data_parallel"]
    job = subprocess.Popen(argv)
    received: list[int] = []

    def forward(signum, frame):  # torchrun passes it on: every process finishes its step, saves and stops
        received.append(signum)
        job.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        rc = job.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 128 + received[0] if received else rc


def run(args: argparse.Namespace) -> int:
    if args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc}: needs at least 1 process")
    if args.nproc > 1 and "RANK" not in os.environ:
        from uniopd.train.plan import plan_teachers

        # What the processes would refuse, refused once here, before torchrun starts them.
        plan_teachers(load_config(args.config, list(args.overrides) + ["trainer.strategy=data_parallel"]))
        return _launch(args)
    from uniopd.train.trainer import Trainer

    overrides = list(args.overrides) + (["data.skip_invalid=true"] if args.skip_invalid else [])
    cfg = load_config(args.config, overrides)
    trainer = Trainer(cfg)
    if args.resume:
        if not trainer.resume():
            print(f"uniopd: --resume: no checkpoint in {cfg.trainer.output_dir}; starting fresh", file=sys.stderr)
    try:
        result = trainer.train()
    finally:
        trainer.engine.close()  # a vLLM engine's memory and temporary weights, also after it failed
        trainer.strategy.close()
    if trainer.strategy.is_main:
        print(json.dumps({k: v for k, v in result.items() if k != "metrics"}))
    return 0 if result["stopped_by_signal"] is None else 128 + int(result["stopped_by_signal"])
