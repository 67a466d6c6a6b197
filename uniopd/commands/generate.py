"""`uniopd generate`: sample responses with a teacher (or any model) and keep the verified
ones, for an off-policy cold start with `uniopd sft` before `uniopd train`.

For student/teacher pairs whose thinking patterns differ, OPD from a cold student wastes
steps on states the teacher never visits; a short SFT on the teacher's own correct
responses first puts the student near the teacher's distribution ("Rethinking OPD").

Response file (JSONL, one object per line): `id`, `domain`, `prompt` (text or messages),
`response` (text), `correct` (bool, from the verifier), `teacher` (model path).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from uniopd.commands.common import add_config_args
from uniopd.config import ConfigError, ModelConfig, RunConfig, load_config
from uniopd.data.prompts import load_prompt_records, prepare_prompts
from uniopd.models.loading import load_model
from uniopd.models.multimodal import StudentVision
from uniopd.rollout.base import build_rollout_engine
from uniopd.rollout.collect import ResponseVerifier, sample_and_verify
from uniopd.runtime import resolve_device, seed_everything
from uniopd.utils import atomic_write_text


def generate_responses(cfg: RunConfig, model_cfg: ModelConfig, data_path: str, out_path: Path, *, k: int,
                       keep: str = "correct", progress: bool = True) -> dict:
    """Sample k responses per prompt with `model_cfg` (usually a teacher) and keep the verified ones."""
    if keep not in ("correct", "all"):
        raise ValueError(f"--keep must be 'correct' or 'all', got {keep!r}")
    seed_everything(cfg.trainer.seed)
    device = resolve_device(cfg.trainer.device)
    records = load_prompt_records(cfg.data, data_path)
    loaded = load_model(model_cfg, "generate.model", device=device, trainable=False)
    vision = StudentVision.of(loaded, model_cfg)  # None for text models
    engine = build_rollout_engine(cfg.rollout, loaded, suppress_ids=vision.suppress_ids if vision else None)
    verifier = ResponseVerifier(loaded.tokenizer, cfg.data.domain_verifiers)
    records, prompt_ids, _ = prepare_prompts(records, loaded.tokenizer, model_cfg, cfg.data,
                                             encode=vision.ids if vision else None,
                                             limit=engine.prompt_limit(model_cfg.max_prompt_tokens))
    generator = torch.Generator(device).manual_seed(cfg.trainer.seed)
    rows, n_correct = [], 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(records), desc="generate", unit="prompt")
    chunk = max(1, cfg.rollout.batch_size // k)
    for start in range(0, len(records), chunk):
        recs = records[start: start + chunk]
        done = sample_and_verify(engine, recs, prompt_ids[start: start + chunk], k, verifier=verifier,
                                 vision=vision, generator=generator)
        for rec, text, correct in zip(done.records, done.texts, done.correct_B.tolist()):
            n_correct += correct
            if keep == "all" or correct:
                rows.append({"id": rec.id, "domain": rec.domain, "prompt": rec.prompt, "response": text,
                             "correct": correct, "teacher": model_cfg.path})
        if bar:
            bar.update(len(recs))
    if bar:
        bar.close()
    engine.close()
    atomic_write_text(out_path, "".join(json.dumps(r) + "\n" for r in rows))
    summary = {"prompts": len(records), "samples": len(records) * k, "correct": n_correct, "written": len(rows),
               "out": str(out_path)}
    print(json.dumps(summary))
    return summary


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="sample responses with a teacher, keep the verified ones (for sft)")
    add_config_args(p)
    p.add_argument("--teacher", help="a teacher name from the config")
    p.add_argument("--model", help="or any model path / hub id / .gguf")
    p.add_argument("--data", help="prompt file (default data.train)")
    p.add_argument("--k", type=int, default=4, help="samples per prompt")
    p.add_argument("--keep", default="correct", choices=["correct", "all"], help="which responses to write")
    p.add_argument("--out", required=True, help="response JSONL to write")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, list(args.overrides))
    if args.model:
        model_cfg = ModelConfig(path=args.model, chat_template=cfg.model.chat_template)
    elif args.teacher:
        if args.teacher not in cfg.teachers:
            raise ConfigError(f"--teacher {args.teacher!r}: not in teachers ({', '.join(cfg.teachers)})")
        model_cfg = cfg.teachers[args.teacher]
    else:
        raise ConfigError("generate needs --teacher NAME (from the config) or --model PATH")
    generate_responses(cfg, model_cfg, args.data or cfg.data.train, Path(args.out), k=args.k, keep=args.keep)
    return 0
