"""`uniopd` command line: train, eval, demo, balance, generate, sft, prepare, config."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from uniopd.config import ConfigError, field_help, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.lr=1e-6 rollout.n=8")


def cmd_train(args: argparse.Namespace) -> int:
    from uniopd.trainer import Trainer

    overrides = list(args.overrides) + (["data.skip_invalid=true"] if args.skip_invalid else [])
    cfg = load_config(args.config, overrides)
    trainer = Trainer(cfg)
    if args.resume:
        if not trainer.resume():
            print(f"uniopd: --resume: no checkpoint in {cfg.trainer.output_dir}; starting fresh", file=sys.stderr)
    result = trainer.train()
    print(json.dumps({k: v for k, v in result.items() if k != "metrics"}))
    return 0 if result["stopped_by_signal"] is None else 128 + int(result["stopped_by_signal"])


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from uniopd.evaluate import evaluate_model
    from uniopd.models.loading import load_model
    from uniopd.setup import load_prompt_records
    from uniopd.utils import resolve_device, seed_everything

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


def cmd_demo(args: argparse.Namespace) -> int:
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


def cmd_balance(args: argparse.Namespace) -> int:
    from uniopd.offline_balance import run_offline_balance

    cfg = load_config(args.config, list(args.overrides))
    run_offline_balance(cfg, out_path=Path(args.out), work_dir=Path(args.work_dir) if args.work_dir else None)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from uniopd.pipeline import generate_responses

    cfg = load_config(args.config, list(args.overrides))
    if args.model:
        from uniopd.config import ModelConfig

        model_cfg = ModelConfig(path=args.model, chat_template=cfg.model.chat_template)
    elif args.teacher:
        if args.teacher not in cfg.teachers:
            raise ConfigError(f"--teacher {args.teacher!r}: not in teachers ({', '.join(cfg.teachers)})")
        model_cfg = cfg.teachers[args.teacher]
    else:
        raise ConfigError("generate needs --teacher NAME (from the config) or --model PATH")
    generate_responses(cfg, model_cfg, args.data or cfg.data.train, Path(args.out), k=args.k, keep=args.keep)
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from uniopd.pipeline import run_sft

    cfg = load_config(args.config, list(args.overrides))
    run_sft(cfg, Path(args.data), Path(args.out))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    if args.dataset == "math-code":
        from uniopd.data.math_code import prepare_math_code

        path, counts = prepare_math_code(args.out, limit=args.limit or None)
        print(json.dumps({"out": str(path), "records": sum(counts.values()), **counts}))
        return 0
    from uniopd.data.easyvqa import prepare_easyvqa

    path = prepare_easyvqa(args.out, split=args.split, limit_images=args.limit_images or None,
                           domains=args.domains, copy_images=not args.no_copy)
    print(json.dumps({"out": str(path), "records": sum(1 for _ in open(path))}))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.config or args.overrides:
        import yaml

        from uniopd.config import to_dict

        print(yaml.safe_dump(to_dict(load_config(args.config, list(args.overrides))), sort_keys=False))
        return 0
    for key, default, help_text in field_help():
        print(f"{key:36s} {default:14s} {help_text}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uniopd", description="On-policy distillation with the Uni-OPD recipe")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run OPD training from a recipe")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint")
    p.add_argument("--skip-invalid", action="store_true", help="skip and count invalid prompt records")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="accuracy avg@k / pass@k of a model on a prompt file")
    _add_config_args(p)
    p.add_argument("--model", help="model path / hub id / .gguf (sets model.path)")
    p.add_argument("--data", help="prompt file (sets data.eval)")
    p.add_argument("--k", type=int, default=1, help="samples per prompt")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (k is then 1)")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N prompts")
    p.add_argument("--out", help="write the results JSON here")
    p.add_argument("--skip-invalid", action="store_true", help="skip and count invalid prompt records")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("demo", help="offline demo: build a teacher and a student, distil, compare")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="OPD steps per method (default: the demo's)")
    p.add_argument("--methods", help="comma list of: opd, uniopd (default: both; opd with --multi-teacher)")
    p.add_argument("--multi-teacher", action="store_true",
                   help="two domains (addition, subtraction), one expert teacher each, one student")
    p.add_argument("--out", help="directory for the runs and their metrics (default: runs/demo[_multi])")
    p.add_argument("--cache-dir", default=None, help="where built models are cached ($UNIOPD_CACHE)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("balance", help="offline difficulty-aware balancing of a prompt file")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="balanced JSONL to write (a PNG histogram goes beside it)")
    p.add_argument("--work-dir", help="where pass-rate estimates are kept for resuming")
    p.set_defaults(fn=cmd_balance)

    p = sub.add_parser("generate", help="sample responses with a teacher, keep the verified ones (for sft)")
    _add_config_args(p)
    p.add_argument("--teacher", help="a teacher name from the config")
    p.add_argument("--model", help="or any model path / hub id / .gguf")
    p.add_argument("--data", help="prompt file (default data.train)")
    p.add_argument("--k", type=int, default=4, help="samples per prompt")
    p.add_argument("--keep", default="correct", choices=["correct", "all"], help="which responses to write")
    p.add_argument("--out", required=True, help="response JSONL to write")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("sft", help="fine-tune the student on a response file (off-policy cold start)")
    _add_config_args(p)
    p.add_argument("--data", required=True, help="response JSONL from `uniopd generate`")
    p.add_argument("--out", required=True, help="directory for the fine-tuned student")
    p.set_defaults(fn=cmd_sft)

    p = sub.add_parser("prepare", help="write a packaged data set as prompt records (easyvqa: images + questions; "
                                       "math-code: CHAMP math + HumanEval code)")
    p.add_argument("dataset", choices=["easyvqa", "math-code"])
    p.add_argument("--out", required=True, help="directory for the JSONL (easyvqa: <split>.jsonl and images/; "
                                                "math-code: train.jsonl)")
    p.add_argument("--limit", type=int, default=0, help="math-code: at most N records per domain (0 = all)")
    p.add_argument("--split", default="train", choices=["train", "test"], help="easyvqa: which split")
    p.add_argument("--limit-images", type=int, default=0, help="easyvqa: only the first N images (0 = all)")
    p.add_argument("--domains", default="vqa", choices=["vqa", "subject"],
                   help="vqa: one domain; subject: vqa_color / vqa_shape by what the question asks")
    p.add_argument("--no-copy", action="store_true", help="refer to the package's image files instead of copying")
    p.set_defaults(fn=cmd_prepare)

    p = sub.add_parser("config", help="print every config key with its default and help, or a resolved config")
    _add_config_args(p)
    p.set_defaults(fn=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from uniopd.data.validate import RecordError
    from uniopd.models.loading import ModelLoadError, VocabularyMismatch

    try:
        return args.fn(args)
    except (ConfigError, RecordError, ModelLoadError, VocabularyMismatch, FileNotFoundError, ValueError) as exc:
        print(f"uniopd {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
