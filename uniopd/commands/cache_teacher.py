"""`uniopd cache-teacher`: a teacher's log-probs over a fixed response file, computed once (Lightning OPD).

    uniopd generate -c recipe.yaml --teacher math --keep all --out responses.jsonl
    uniopd cache-teacher -c recipe.yaml --teacher math --responses responses.jsonl --out cache/math
    uniopd train -c recipe.yaml rollout.backend=replay rollout.replay_responses=responses.jsonl \\
        teachers.math.backend=cache teachers.math.cache=cache/math

Any scorer scores (the teacher's configured backend: local, or remote servers). Shards of
`--shard-size` sequences are written as they finish and the manifest lists them, so an
interrupted run continues where it stopped when started again with the same --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
from pathlib import Path

from uniopd.commands.common import add_config_args


def add_parser(sub) -> None:
    p = sub.add_parser("cache-teacher", help="precompute a teacher's log-probs over a response file")
    add_config_args(p)
    p.add_argument("--teacher", required=True, help="a teacher name from the config")
    p.add_argument("--responses", required=True, help="response JSONL (`uniopd generate`'s format)")
    p.add_argument("--out", required=True, help="cache directory (manifest.json + shards)")
    p.add_argument("--top-k", type=int, default=None, help="also store the top-k (default teachers.<name>.top_k)")
    p.add_argument("--shard-size", type=int, default=1024, help="sequences per shard")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from uniopd.config import ConfigError, load_config

    cfg = load_config(args.config, list(args.overrides))
    if args.teacher not in cfg.teachers:
        raise ConfigError(f"--teacher {args.teacher!r}: not in teachers ({', '.join(cfg.teachers)})")
    if args.shard_size < 1:
        raise ConfigError(f"--shard-size {args.shard_size}: needs at least 1")
    summary = cache_teacher(cfg, args.teacher, args.responses, Path(args.out), top_k=args.top_k,
                            shard_size=args.shard_size)
    print(json.dumps(summary))
    return 0


def cache_teacher(cfg, name: str, responses_path: str, out: Path, *, top_k: int | None = None,
                  shard_size: int = 1024, preloaded=None) -> dict:
    """Score every response of the file with teacher `name` and write the cache; returns a summary."""
    import torch
    from safetensors.torch import save_file

    from uniopd.config import ConfigError
    from uniopd.data.prompts import load_prompt_records
    from uniopd.data.records import PromptRecord
    from uniopd.models.loading import load_tokenizer
    from uniopd.rollout.replay import file_sha256, read_responses, response_ids
    from uniopd.runtime import resolve_device
    from uniopd.teachers.base import LOGP, TOPK, ScorerContext, scorer_class
    from uniopd.teachers.cache import FORMAT, sequence_key, teacher_hash, tokenizer_hash, view_settings
    from uniopd.utils import atomic_write_text

    tcfg = dataclasses.replace(cfg.teachers[name], top_k=top_k or cfg.teachers[name].top_k)
    if tcfg.backend == "cache":
        raise ConfigError(f"teachers.{name}.backend=cache: cache-teacher needs a teacher that scores (local, remote)")
    student_tok = load_tokenizer(cfg.model, "model")
    rows = read_responses(responses_path, "--responses")
    # Records of the prompt set, by id: views such as `privileged` need fields the response file lacks.
    known = {r.id: r for r in load_prompt_records(cfg.data, cfg.data.train)} if cfg.data.train else {}
    records = [known.get(row["id"]) or PromptRecord(id=row["id"], domain=row.get("domain") or "default",
                                                    prompt=row["prompt"]) for row in rows]
    responses = [response_ids(student_tok, row) for row in rows]
    manifest = {"format": FORMAT,
                "teacher": {"name": name, "path": tcfg.path, "backend": tcfg.backend, "hash": teacher_hash(tcfg.path)},
                "tokenizer_hash": tokenizer_hash(student_tok), "view": view_settings(tcfg), "top_k": tcfg.top_k,
                "responses": {"path": str(responses_path), "sha256": file_sha256(responses_path), "rows": len(rows)},
                "shard_size": shard_size, "shards": [], "complete": False}
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    if manifest_path.exists():  # resume: same identity, keep the shards already written
        old = json.loads(manifest_path.read_text())
        same = {k: v for k, v in old.items() if k not in ("shards", "complete")}
        if same != {k: v for k, v in manifest.items() if k not in ("shards", "complete")}:
            raise ConfigError(f"--out {out}: holds a cache of other settings (teacher, view, top_k or responses); "
                              f"choose another directory")
        manifest["shards"] = [s for s in old["shards"] if (out / s["file"]).exists()
                              and file_sha256(out / s["file"]) == s["sha256"]]
    done = len(manifest["shards"])
    student = types.SimpleNamespace(tokenizer=student_tok, source=cfg.model.path, model=None, processor=None)
    ctx = ScorerContext(student, resolve_device(cfg.trainer.device), chunk_size=cfg.loss.chunk_size,
                        micro_batch_size=cfg.trainer.micro_batch_size, preloaded=preloaded)
    scorer = None
    want = frozenset({LOGP, TOPK}) if tcfg.top_k else frozenset({LOGP})
    try:
        for index, start in enumerate(range(0, len(rows), shard_size)):
            if index < done:
                continue
            if scorer is None:
                scorer = scorer_class(name, tcfg).from_config(name, tcfg, ctx)
            recs, resps = records[start: start + shard_size], responses[start: start + shard_size]
            scores = scorer.score(recs, resps, want=want)
            if scores.ok_S is not None and not bool(scores.ok_S.all()):
                raise ConfigError(f"teacher {name!r} gave no usable answer for {int((~scores.ok_S).sum())} sequences "
                                  f"of shard {index} ({scores.error}); the {index} shards before it are kept, run "
                                  f"again to continue")
            tensors = {"logp_N": scores.logp_N.float().contiguous(),
                       "lengths_S": torch.tensor([len(r) for r in resps], dtype=torch.long)}
            if tcfg.top_k:
                tensors["topk_ids_NK"] = scores.topk_ids_NK.to(torch.int32).contiguous()
                tensors["topk_logp_NK"] = scores.topk_logp_NK.float().contiguous()
            file = f"shard_{index:05d}.safetensors"
            tmp = out / (file + ".tmp")
            save_file(tensors, str(tmp), metadata={"keys": json.dumps([sequence_key(r.id, s)
                                                                       for r, s in zip(recs, resps)])})
            tmp.replace(out / file)
            manifest["shards"].append({"file": file, "sequences": len(resps), "sha256": file_sha256(out / file)})
            atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
    finally:
        if scorer is not None:
            scorer.close()
    manifest["complete"] = True
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
    return {"sequences": len(rows), "tokens": sum(map(len, responses)), "shards": len(manifest["shards"]),
            "resumed_shards": done, "out": str(out)}
