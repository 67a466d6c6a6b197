"""Teacher log-probs computed once, read back while training (`teachers.<name>.backend: cache`).

`uniopd cache-teacher` scores a fixed response file with any teacher scorer (local, remote)
and writes, per shard of sequences, a safetensors file: the sampled tokens' log-probs
(`logp_N`), response lengths (`lengths_S`) and, with `top_k`, the teacher's top-k ids and
log-probs; the sequences' keys (record id + response token ids) ride in the file's metadata.
`manifest.json` names what the numbers depend on: the teacher (path and a hash of its files),
the tokenizer's vocabulary hash, the view settings, top_k and the response file's SHA-256.
The writer resumes from the shards already written; the reader refuses a cache whose
manifest does not match the run's config.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from uniopd.config import ConfigError, TeacherConfig
from uniopd.data.records import PromptRecord
from uniopd.teachers.base import LOGP, TOPK, ScorerContext, TeacherScorer, TeacherScores

log = logging.getLogger(__name__)

FORMAT = 1
VIEW_KEYS = ("view", "system_prompt", "privileged_template", "image_template", "chat_template")


def sequence_key(record_id: str, response: list[int]) -> str:
    return hashlib.sha256(f"{record_id}\0{','.join(map(str, response))}".encode()).hexdigest()[:32]


def tokenizer_hash(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def teacher_hash(path: str) -> str | None:
    """SHA-256 over a local teacher's config and weight files (None for a hub id or no path)."""
    from uniopd.utils import resolve_path

    if not path:
        return None
    p = Path(resolve_path(path))
    files = [p] if p.is_file() else sorted(f for f in p.glob("*") if f.suffix in (".json", ".safetensors", ".bin",
                                                                                      ".gguf", ".model")) \
        if p.is_dir() else []
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def view_settings(cfg: TeacherConfig) -> dict:
    return {k: getattr(cfg, k) for k in VIEW_KEYS}


def read_manifest(directory: str | Path, key: str) -> dict:
    path = Path(directory) / "manifest.json"
    if not path.exists():
        raise ConfigError(f"{key}={str(directory)!r}: no manifest.json (write one with `uniopd cache-teacher`)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{key}: {path} has format {manifest.get('format')!r}, this uniopd reads {FORMAT}")
    return manifest


class CachedTeacher(TeacherScorer):
    options = frozenset({"cache"})

    def __init__(self, name: str, cfg: TeacherConfig, manifest: dict, directory: Path):
        super().__init__(name, cfg)
        from safetensors import safe_open

        self.manifest, self.directory = manifest, directory
        self.index: dict[str, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = {}
        for shard in manifest["shards"]:
            with safe_open(str(directory / shard["file"]), "pt") as f:
                keys = json.loads(f.metadata()["keys"])
                lengths = f.get_tensor("lengths_S").tolist()
                logp = f.get_tensor("logp_N").split(lengths)
                has_topk = "topk_ids_NK" in f.keys()
                ids = f.get_tensor("topk_ids_NK").long().split(lengths) if has_topk else [None] * len(keys)
                tops = f.get_tensor("topk_logp_NK").split(lengths) if has_topk else [None] * len(keys)
            for k, a, b, c in zip(keys, logp, ids, tops):
                self.index[k] = (a, b, c)

    @classmethod
    def outputs(cls, cfg: TeacherConfig) -> frozenset[str]:
        return frozenset({LOGP, TOPK}) if cfg.top_k else frozenset({LOGP})

    @classmethod
    def from_config(cls, name: str, cfg: TeacherConfig, ctx: ScorerContext) -> "CachedTeacher":
        key = f"teachers.{name}"
        if not cfg.cache:
            raise ConfigError(f"{key}.backend=cache needs {key}.cache (a directory from `uniopd cache-teacher`)")
        manifest = read_manifest(cfg.cache, f"{key}.cache")
        check_manifest(manifest, name, cfg, ctx.student.tokenizer)
        return cls(name, cfg, manifest, Path(cfg.cache))

    def score(self, records: list[PromptRecord], responses: list[list[int]], *,
              want: frozenset[str] = frozenset({LOGP})) -> TeacherScores:
        logps, ids, tops = [], [], []
        for record, response in zip(records, responses):
            hit = self.index.get(sequence_key(record.id, response))
            if hit is None:
                raise ConfigError(
                    f"teachers.{self.name}.cache: no entry for record {record.id!r} with this response; the cache "
                    f"covers the responses of {self.manifest['responses']['path']} (sha256 "
                    f"{self.manifest['responses']['sha256'][:12]}), replay that file (rollout.replay_responses)")
            logps.append(hit[0])
            if TOPK in want:
                ids.append(hit[1][:, : self.cfg.top_k])
                tops.append(hit[2][:, : self.cfg.top_k])
        return TeacherScores(torch.cat(logps) if logps else torch.zeros(0),
                             topk_ids_NK=torch.cat(ids) if ids else None,
                             topk_logp_NK=torch.cat(tops) if tops else None)


def check_manifest(manifest: dict, name: str, cfg: TeacherConfig, student_tokenizer) -> None:
    """Refuse a cache computed under other settings than this run's, naming the key that differs."""
    key = f"teachers.{name}"
    if not manifest.get("complete"):
        raise ConfigError(f"{key}.cache: the cache is incomplete ({len(manifest.get('shards', []))} shards); "
                          f"run `uniopd cache-teacher` again with the same --out to finish it")
    if manifest["tokenizer_hash"] != tokenizer_hash(student_tokenizer):
        raise ConfigError(f"{key}.cache: computed for another vocabulary than the student's (tokenizer hash "
                          f"{manifest['tokenizer_hash'][:12]})")
    for field, cached in manifest["view"].items():
        if getattr(cfg, field) != cached:
            raise ConfigError(f"{key}.{field}={getattr(cfg, field)!r}, but the cache was computed with "
                              f"{field}={cached!r}")
    if cfg.top_k and (manifest["top_k"] or 0) < cfg.top_k:
        raise ConfigError(f"{key}.top_k={cfg.top_k}, but the cache holds top-{manifest['top_k'] or 0} only")
    teacher = manifest["teacher"]
    if cfg.path and cfg.path != teacher["path"]:
        raise ConfigError(f"{key}.path={cfg.path!r}, but the cache was computed with teacher {teacher['path']!r}")
    if cfg.path and teacher.get("hash") and teacher_hash(cfg.path) not in (None, teacher["hash"]):
        raise ConfigError(f"{key}.path={cfg.path!r}: its files changed since the cache was computed "
                          f"(hash {teacher['hash'][:12]})")
