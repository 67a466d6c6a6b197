"""`uniopd sft`: fine-tune the student on a response file from `uniopd generate` (the
off-policy cold start), writing a checkpoint directory that `uniopd train` can start from."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from uniopd.commands.common import add_config_args
from uniopd.config import ModelConfig, RunConfig, load_config
from uniopd.data.validate import RecordError
from uniopd.models.loading import load_model
from uniopd.models.prompts import render_prompt
from uniopd.runtime import resolve_device, seed_everything
from uniopd.train.sft import sft_train


def load_response_pairs(path: Path, tokenizer, model_cfg: ModelConfig) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + EOS) from a response file; bad lines name file:line and field."""
    pairs = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RecordError(where, "<json>", f"invalid JSON: {exc.msg}") from None
            if not isinstance(row, dict):
                raise RecordError(where, "<record>", "expected a JSON object")
            prompt, response = row.get("prompt"), row.get("response")
            if not (isinstance(prompt, (str, list)) and prompt):
                raise RecordError(where, "prompt", "expected a non-empty string or list of messages")
            if not isinstance(response, str) or not response.strip():
                raise RecordError(where, "response", "expected a non-empty string")
            ids = render_prompt(tokenizer, prompt, chat_template=model_cfg.chat_template)
            resp = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            pairs.append((ids, resp))
    if not pairs:
        raise ValueError(f"{path}: no responses to train on")
    return pairs


def run_sft(cfg: RunConfig, data_path: Path, out_dir: Path, *, progress: bool = True) -> Path:
    """Fine-tune the student (`model`) on a response file; save a loadable checkpoint dir."""
    seed_everything(cfg.trainer.seed)
    device = resolve_device(cfg.trainer.device)
    student = load_model(cfg.model, "model", device=device)
    pairs = load_response_pairs(Path(data_path), student.tokenizer, cfg.model)
    sft_train(student, pairs, cfg.sft, seed=cfg.trainer.seed, chunk_size=cfg.loss.chunk_size, progress=progress)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    student.model.save_pretrained(tmp)
    (student.processor or student.tokenizer).save_pretrained(tmp)  # a VLM keeps its image processor
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    print(json.dumps({"pairs": len(pairs), "steps": cfg.sft.steps, "out": str(out_dir)}))
    return out_dir


def add_parser(sub) -> None:
    p = sub.add_parser("sft", help="fine-tune the student on a response file (off-policy cold start)")
    add_config_args(p)
    p.add_argument("--data", required=True, help="response JSONL from `uniopd generate`")
    p.add_argument("--out", required=True, help="directory for the fine-tuned student")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, list(args.overrides))
    run_sft(cfg, Path(args.data), Path(args.out))
    return 0
