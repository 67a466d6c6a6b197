"""`uniopd export CHECKPOINT OUT_DIR`: a training checkpoint (full or sharded; or a run
directory, meaning its newest verified checkpoint) as a plain `save_pretrained` directory
that `uniopd eval`, transformers and vLLM load (`uniopd.train.export`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="a checkpoint (full or sharded) as a plain save_pretrained model directory")
    p.add_argument("checkpoint", help="a checkpoint directory (checkpoints/step_N) or a run directory (its newest "
                                      "verified checkpoint)")
    p.add_argument("out_dir", help="the model directory to create (must not exist)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from uniopd.train.export import export_checkpoint

    print(json.dumps(export_checkpoint(Path(args.checkpoint), Path(args.out_dir))))
    return 0
