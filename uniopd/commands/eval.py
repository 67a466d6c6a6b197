"""`uniopd eval`: avg@k and unbiased pass@k of a model on a prompt file or on benchmarks that
ship offline (`--benchmark humaneval,champ,...`, `uniopd.data.benchmarks`), or of given
responses (`--responses FILE`, no model). Results as JSON (`--out`) and Markdown tables per
benchmark and per domain (`--markdown`, default beside `--out`)."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from uniopd.commands.common import add_config_args
from uniopd.config import ConfigError, load_config


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="accuracy avg@k / pass@k of a model on a prompt file or offline benchmarks")
    add_config_args(p)
    p.add_argument("--model", help="model path / hub id / .gguf (sets model.path)")
    p.add_argument("--data", help="prompt file (sets data.eval)")
    p.add_argument("--benchmark", help="comma list of offline benchmarks: humaneval, champ, rg-arithmetic, rg-gsm, "
                                       "easyvqa (instead of --data)")
    p.add_argument("--responses", help="JSONL of {id, response} rows to grade instead of sampling a model "
                                       "(the same number of responses for every record)")
    p.add_argument("--k", type=int, default=1, help="samples per prompt")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (k is then 1)")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N prompts (of each benchmark)")
    p.add_argument("--out", help="write the results JSON here")
    p.add_argument("--markdown", help="write the Markdown tables here (default: --out with .md)")
    p.add_argument("--skip-invalid", action="store_true", help="skip and count invalid prompt records")
    p.set_defaults(run=run)


def _read_responses(path: Path) -> dict[str, list[str]]:
    """{record id: its responses} from {id, response} JSONL rows (read as prompt files are: bounded,
    regular files only); a bad row names file:line and field."""
    from uniopd.data.loader import iter_jsonl_raw
    from uniopd.data.validate import RecordError

    out: dict[str, list[str]] = defaultdict(list)
    for lineno, row in iter_jsonl_raw(path):
        if not isinstance(row, dict) or not isinstance(row.get("id"), str):
            raise RecordError(f"{path}:{lineno}", "id", "expected an object with a string id")
        if not isinstance(row.get("response"), str):
            raise RecordError(f"{path}:{lineno}", "response", "expected a string")
        out[row["id"]].append(row["response"])
    return dict(out)


def run(args: argparse.Namespace) -> int:
    from uniopd.data.benchmarks import benchmark_records
    from uniopd.data.prompts import load_prompt_records
    from uniopd.evaluate import evaluate_responses, results_markdown
    from uniopd.runtime import seed_everything

    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model.path={args.model}")
    if args.data:
        overrides.append(f"data.eval={args.data}")
    if args.skip_invalid:
        overrides.append("data.skip_invalid=true")
    cfg = load_config(args.config, overrides)
    if args.benchmark:
        suites = {name: benchmark_records(name, args.limit or None) for name in args.benchmark.split(",") if name}
    elif cfg.data.eval:
        records = load_prompt_records(cfg.data, cfg.data.eval)
        suites = {Path(cfg.data.eval).stem: records[: args.limit] if args.limit else records}
    else:
        raise ConfigError("eval needs --benchmark NAME, or a prompt file: --data FILE or data.eval=FILE")
    seed_everything(cfg.trainer.seed)
    if args.responses:
        given = _read_responses(Path(args.responses))
        results = {name: evaluate_responses(records, given, cfg.data) for name, records in suites.items()}
        source = args.responses
    else:
        results = _sample_and_grade(cfg, suites, args)
        source = cfg.model.path
    out = next(iter(results.values())) if not args.benchmark else {"benchmarks": results}
    out = {**out, "model": source, "data": args.benchmark or cfg.data.eval}
    text = json.dumps(out, indent=2)
    markdown = results_markdown(results)
    from uniopd.utils import atomic_write_text

    if args.out:
        atomic_write_text(Path(args.out), text + "\n")
    md_path = args.markdown or (str(Path(args.out).with_suffix(".md")) if args.out else None)
    if md_path:
        atomic_write_text(Path(md_path), markdown)
    print(text)
    return 0


def _sample_and_grade(cfg, suites: dict, args: argparse.Namespace) -> dict:
    import torch

    from uniopd.evaluate import evaluate_model
    from uniopd.models.loading import load_model
    from uniopd.runtime import resolve_device

    if not cfg.model.path:
        raise ConfigError("eval needs a model (--model PATH or model.path=...) or --responses FILE")
    device = resolve_device(cfg.trainer.device)
    loaded = load_model(cfg.model, "model", device=device, trainable=False)
    return {name: evaluate_model(loaded, records, cfg.rollout, cfg.model, cfg.data, k=args.k, greedy=args.greedy,
                                 generator=torch.Generator(device).manual_seed(cfg.trainer.seed))
            for name, records in suites.items()}
