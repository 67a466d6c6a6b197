"""Off-policy cold start: `uniopd generate` (teacher responses, verifier-filtered) and
`uniopd sft` (fine-tune the student on them) before `uniopd train`.

For student/teacher pairs whose thinking patterns differ, OPD from a cold student wastes
steps on states the teacher never visits; a short SFT on the teacher's own correct
responses first puts the student near the teacher's distribution ("Rethinking OPD").

Response file (JSONL, one object per line): `id`, `domain`, `prompt` (text or messages),
`response` (text), `correct` (bool, from the verifier), `teacher` (model path).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from uniopd.config import ModelConfig, RunConfig
from uniopd.data.validate import RecordError
from uniopd.models.loading import load_model
from uniopd.models.prompts import render_prompt
from uniopd.rewards import verify_batch
from uniopd.rollout.hf import generate
from uniopd.setup import load_prompt_records, prepare_prompts
from uniopd.utils import atomic_write_text, resolve_device, seed_everything


def generate_responses(cfg: RunConfig, model_cfg: ModelConfig, data_path: str, out_path: Path, *, k: int,
                       keep: str = "correct", progress: bool = True) -> dict:
    """Sample k responses per prompt with `model_cfg` (usually a teacher) and keep the verified ones."""
    if keep not in ("correct", "all"):
        raise ValueError(f"--keep must be 'correct' or 'all', got {keep!r}")
    seed_everything(cfg.trainer.seed)
    device = resolve_device(cfg.trainer.device)
    records = load_prompt_records(cfg.data, data_path)
    loaded = load_model(model_cfg, "generate.model", device=device, trainable=False)
    from uniopd.models.multimodal import StudentVision

    tok = loaded.tokenizer
    vision = StudentVision.of(loaded, model_cfg)  # None for text models
    records, prompt_ids, _ = prepare_prompts(records, tok, model_cfg, cfg.data, encode=vision.ids if vision else None)
    generator = torch.Generator(device).manual_seed(cfg.trainer.seed)
    rows, n_correct = [], 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(records), desc="generate", unit="prompt")
    chunk = max(1, cfg.rollout.batch_size // k)
    for start in range(0, len(records), chunk):
        recs = records[start: start + chunk]
        groups = generate(loaded.model, prompt_ids[start: start + chunk], cfg.rollout, n=k,
                          eos_ids={tok.eos_token_id}, pad_id=tok.pad_token_id, generator=generator,
                          multimodal=vision.inputs(recs) if vision else None,
                          suppress_ids=vision.suppress_ids if vision else None)
        texts = tok.batch_decode([s.response_ids for g in groups for s in g], skip_special_tokens=True)
        flat = [r for r in recs for _ in range(k)]
        outcomes = verify_batch(texts, flat, domain_defaults=cfg.data.domain_verifiers or None)
        for rec, text, outcome in zip(flat, texts, outcomes):
            n_correct += outcome.correct
            if keep == "all" or outcome.correct:
                rows.append({"id": rec.id, "domain": rec.domain, "prompt": rec.prompt, "response": text,
                             "correct": outcome.correct, "teacher": model_cfg.path})
        if bar:
            bar.update(len(recs))
    if bar:
        bar.close()
    atomic_write_text(out_path, "".join(json.dumps(r) + "\n" for r in rows))
    summary = {"prompts": len(records), "samples": len(records) * k, "correct": n_correct, "written": len(rows),
               "out": str(out_path)}
    print(json.dumps(summary))
    return summary


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
    from uniopd.sft import SFTConfig, sft_train

    seed_everything(cfg.trainer.seed)
    device = resolve_device(cfg.trainer.device)
    student = load_model(cfg.model, "model", device=device)
    pairs = load_response_pairs(Path(data_path), student.tokenizer, cfg.model)
    sc = cfg.sft
    sft_train(student, pairs, SFTConfig(steps=sc.steps, batch_size=sc.batch_size, lr=sc.lr,
                                        warmup_steps=sc.warmup_steps, seed=cfg.trainer.seed,
                                        chunk_size=cfg.loss.chunk_size), progress=progress)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    student.model.save_pretrained(tmp)
    (student.processor or student.tokenizer).save_pretrained(tmp)  # a VLM keeps its image processor
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    print(json.dumps({"pairs": len(pairs), "steps": sc.steps, "out": str(out_dir)}))
    return out_dir
