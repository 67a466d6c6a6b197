"""`uniopd balance`: offline difficulty-aware balancing of a prompt file.

1. Estimate each prompt's pass rate with `balance.offline_k` student rollouts (verified).
   Estimates are appended to `<work_dir>/pass_rates.jsonl` as they are made, so an
   interrupted run resumes where it stopped.
2. `difficulty_balance` picks indices (with repeats; every prompt at least once).
3. Write the balanced JSONL (a repeat of record `x` gets id `x#r1`, `x#r2`, ... and its
   source id and pass rate in `meta`) and a PNG of the pass-rate histogram before/after.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from pathlib import Path

import torch

from uniopd.algo.balance import difficulty_balance, pass_rate_histogram
from uniopd.algo.balance_plot import save_histogram_png
from uniopd.commands.common import add_config_args
from uniopd.config import RunConfig, load_config
from uniopd.data.loader import write_records
from uniopd.data.prompts import load_prompt_records, prepare_prompts
from uniopd.data.records import PromptRecord
from uniopd.models.loading import load_model
from uniopd.models.multimodal import StudentVision
from uniopd.rollout.base import build_rollout_engine
from uniopd.rollout.collect import ResponseVerifier, sample_and_verify
from uniopd.runtime import resolve_device, seed_everything

log = logging.getLogger(__name__)


def _read_estimates(path: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                out[row["id"]] = float(row["pass_rate"])
    return out


def estimate_pass_rates(cfg: RunConfig, records: list[PromptRecord], cache_path: Path, *,
                        chunk_prompts: int = 16, progress: bool = True) -> dict[str, float]:
    done = _read_estimates(cache_path)
    todo = [r for r in records if r.id not in done]
    if not todo:
        return done
    device = resolve_device(cfg.trainer.device)
    student = load_model(cfg.model, "model", device=device, trainable=False)
    tok = student.tokenizer
    vision = StudentVision.of(student, cfg.model)  # None for text models
    engine = build_rollout_engine(cfg.rollout, student, suppress_ids=vision.suppress_ids if vision else None)
    verifier = ResponseVerifier(tok, cfg.data.domain_verifiers)
    todo, prompt_ids, _ = prepare_prompts(todo, tok, cfg.model, cfg.data, encode=vision.ids if vision else None,
                                          limit=engine.prompt_limit(cfg.model.max_prompt_tokens))
    generator = torch.Generator(device).manual_seed(cfg.trainer.seed)
    k = cfg.balance.offline_k
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(records), initial=len(records) - len(todo), desc="pass rates", unit="prompt")
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    with open(cache_path, "a") as fh:
        for start in range(0, len(todo), chunk_prompts):
            recs = todo[start: start + chunk_prompts]
            done_now = sample_and_verify(engine, recs, prompt_ids[start: start + chunk_prompts], k,
                                         verifier=verifier, vision=vision, generator=generator)
            correct = done_now.correct_B.tolist()
            for i, rec in enumerate(recs):
                rate = sum(correct[i * k:(i + 1) * k]) / k
                done[rec.id] = rate
                fh.write(json.dumps({"id": rec.id, "pass_rate": rate}) + "\n")
            fh.flush()
            if bar:
                bar.update(len(recs))
    if bar:
        bar.close()
    return done


def balanced_records(records: list[PromptRecord], rates: list[float], *, num_bins: int,
                     seed: int) -> list[PromptRecord]:
    indices = difficulty_balance(rates, num_bins=num_bins, seed=seed)
    copies: Counter = Counter()
    out = []
    for i in indices:
        rec = records[i]
        n = copies[i]
        copies[i] += 1
        meta = {**rec.meta, "source_id": rec.id, "pass_rate": rates[i]}
        new_id = rec.id if n == 0 else f"{rec.id}#r{n}"
        out.append(PromptRecord(**{**rec.__dict__, "id": new_id, "meta": meta}))
    return out


def run_offline_balance(cfg: RunConfig, out_path: Path, work_dir: Path | None = None,
                        progress: bool = True) -> dict:
    seed_everything(cfg.trainer.seed)
    records = load_prompt_records(cfg.data, cfg.data.train)
    work_dir = work_dir or out_path.with_suffix(".work")
    estimates = estimate_pass_rates(cfg, records, work_dir / "pass_rates.jsonl", progress=progress)
    records = [r for r in records if r.id in estimates]  # overlong prompts skipped by data.overlong
    rates = [estimates[r.id] for r in records]
    balanced = balanced_records(records, rates, num_bins=cfg.balance.num_bins, seed=cfg.trainer.seed)
    write_records(out_path, balanced)
    before = pass_rate_histogram(rates, num_bins=cfg.balance.num_bins)
    after = pass_rate_histogram([r.meta["pass_rate"] for r in balanced], num_bins=cfg.balance.num_bins)
    png = out_path.with_suffix(".png")
    save_histogram_png(before, after, png, num_bins=cfg.balance.num_bins)
    summary = {"prompts": len(records), "balanced": len(balanced), "hist_before": before, "hist_after": after,
               "out": str(out_path), "png": str(png)}
    print(json.dumps(summary))
    return summary


def add_parser(sub) -> None:
    p = sub.add_parser("balance", help="offline difficulty-aware balancing of a prompt file")
    add_config_args(p)
    p.add_argument("--out", required=True, help="balanced JSONL to write (a PNG histogram goes beside it)")
    p.add_argument("--work-dir", help="where pass-rate estimates are kept for resuming")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, list(args.overrides))
    run_offline_balance(cfg, out_path=Path(args.out), work_dir=Path(args.work_dir) if args.work_dir else None)
    return 0
