"""`uniopd eval`: accuracy avg@k / pass@k of a model on a prompt file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from uniopd.commands.common import add_config_args
from uniopd.config import ConfigError, load_config


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="accuracy avg@k / pass@k of a model on a prompt file")
    add_config_args(p)
    p.add_argument("--model", help="model path / hub id / .gguf (sets model.path)")
    p.add_argument("--data", help="prompt file (sets data.eval)")
    p.add_argument("--k", type=int, default=1, help="samples per prompt")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (k is then 1)")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N prompts")
    p.add_argument("--out", help="write the results JSON here")
    p.add_argument("--skip-invalid", action="store_true", help="skip and count invalid prompt records")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from uniopd.data.prompts import load_prompt_records
    from uniopd.evaluate import evaluate_model
    from uniopd.models.loading import load_model
    from uniopd.runtime import resolve_device, seed_everything

    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model.path={args.model}")
    if args.data:
        overrides.append(f"data.eval={args.data}")
    if args.skip_invalid:
        overrides.append("data.skip_invalid=true")
    cfg = load_config(args.config, overrides)
    if not cfg.data.eval:
        raise ConfigError("eval needs a prompt file: --data FILE or data.eval=FILE")
    seed_everything(cfg.trainer.seed)
    device = resolve_device(cfg.trainer.device)
    loaded = load_model(cfg.model, "model", device=device, trainable=False)
    records = load_prompt_records(cfg.data, cfg.data.eval)
    if args.limit:
        records = records[: args.limit]
    result = evaluate_model(loaded, records, cfg.rollout, cfg.model, cfg.data, k=args.k, greedy=args.greedy,
                            generator=torch.Generator(device).manual_seed(cfg.trainer.seed))
    result["model"] = cfg.model.path
    result["data"] = cfg.data.eval
    text = json.dumps(result, indent=2)
    if args.out:
        from uniopd.utils import atomic_write_text

        atomic_write_text(Path(args.out), text + "\n")
    print(text)
    return 0
