"""`uniopd eval`: accuracy avg@k and pass@k of a model on a prompt file with its verifiers.

avg@k is the mean correctness over k samples per prompt. pass@j (j ≤ k) uses the unbiased
estimator of Chen et al. (2021): 1 − C(n−c, j) / C(n, j) for n samples of which c are
correct, averaged over prompts. With k = 1 and greedy decoding, avg@1 is plain accuracy.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch

from uniopd.config import DataConfig, ModelConfig, RolloutConfig
from uniopd.data.prompts import prepare_prompts
from uniopd.data.records import PromptRecord
from uniopd.models.loading import LoadedModel
from uniopd.models.multimodal import StudentVision
from uniopd.rollout.base import RolloutEngine, build_rollout_engine
from uniopd.rewards import verify_batch
from uniopd.rollout.collect import ResponseVerifier, sample_and_verify


def pass_at_k(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate_model(loaded: LoadedModel, records: list[PromptRecord], rollout_cfg: RolloutConfig,
                   model_cfg: ModelConfig, data_cfg: DataConfig, *, k: int = 1, greedy: bool = False,
                   generator: torch.Generator | None = None, progress: bool = True,
                   chunk_prompts: int = 64, engine: RolloutEngine | None = None) -> dict[str, Any]:
    """engine: the rollout engine to sample with (a training run passes its own); default: one
    built from `rollout_cfg` for `loaded`."""
    tok = loaded.tokenizer
    vision = StudentVision.of(loaded, model_cfg)  # None for text models
    if engine is None:
        engine = build_rollout_engine(rollout_cfg, loaded, suppress_ids=vision.suppress_ids if vision else None)
    verifier = ResponseVerifier(tok, data_cfg.domain_verifiers)
    records, prompt_ids, _ = prepare_prompts(records, tok, model_cfg, data_cfg,
                                             encode=vision.ids if vision else None,
                                             limit=engine.prompt_limit(model_cfg.max_prompt_tokens))
    n = 1 if greedy else k
    correct_by_prompt: list[list[bool]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(records), desc="eval", unit="prompt")
    for start in range(0, len(records), chunk_prompts):
        recs = records[start: start + chunk_prompts]
        done = sample_and_verify(engine, recs, prompt_ids[start: start + chunk_prompts], n, verifier=verifier,
                                 vision=vision, greedy=greedy, generator=generator)
        correct = done.correct_B.tolist()
        for i in range(len(recs)):
            correct_by_prompt.append(correct[i * n:(i + 1) * n])
        if bar:
            bar.update(len(recs))
    if bar:
        bar.close()

    return summarise_correctness(records, correct_by_prompt, n)


def _pass_ks(n: int) -> list[int]:
    return sorted({1, n} | {2 ** i for i in range(1, n.bit_length()) if 2 ** i < n})


def _summarise(rows: list[list[bool]], n: int) -> dict[str, float]:
    out = {f"avg@{n}": sum(sum(r) / len(r) for r in rows) / max(len(rows), 1)}
    for j in _pass_ks(n):
        out[f"pass@{j}"] = sum(pass_at_k(len(r), sum(r), j) for r in rows) / max(len(rows), 1)
    return out


def summarise_correctness(records: list[PromptRecord], correct_by_prompt: list[list[bool]], n: int) -> dict[str, Any]:
    """avg@n and unbiased pass@j (j = 1, 2, 4, ..., n) overall and per domain; n samples per prompt."""
    by_domain: dict[str, list[list[bool]]] = defaultdict(list)
    for r, c in zip(records, correct_by_prompt):
        by_domain[r.domain].append(c)
    per_domain = {d: _summarise(rows, n) for d, rows in sorted(by_domain.items())}
    return {"metrics": _summarise(correct_by_prompt, n), "per_domain": per_domain, "num_prompts": len(records),
            "samples_per_prompt": n}


def evaluate_responses(records: list[PromptRecord], responses: dict[str, list[str]],
                       data_cfg: DataConfig) -> dict[str, Any]:
    """Grade given responses (record id -> its responses, the same number for every record)
    with the records' verifiers, and summarise them as `evaluate_model` does."""
    missing = [r.id for r in records if r.id not in responses]
    if missing:
        raise ValueError(f"no response for {len(missing)} records, e.g. {missing[:3]}")
    counts = {len(responses[r.id]) for r in records}
    if len(counts) != 1:
        raise ValueError(f"every record needs the same number of responses; found {sorted(counts)}")
    n = counts.pop()
    flat_records = [r for r in records for _ in range(n)]
    texts = [t for r in records for t in responses[r.id]]
    outcomes = verify_batch(texts, flat_records, domain_defaults=data_cfg.domain_verifiers or None)
    correct = [o.correct for o in outcomes]
    return summarise_correctness(records, [correct[i * n:(i + 1) * n] for i in range(len(records))], n)


def results_markdown(results: dict[str, dict[str, Any]]) -> str:
    """Markdown tables of `{benchmark: result}`: one row per benchmark, then one per domain."""
    lines = []
    for title, rows in (("benchmark", {k: v["metrics"] for k, v in results.items()}),
                        ("benchmark / domain", {f"{k} / {d}": m for k, v in results.items()
                                                for d, m in v["per_domain"].items()})):
        keys = sorted({key for m in rows.values() for key in m}, key=lambda k: (k.split("@")[0], int(k.split("@")[1])))
        lines += [f"| {title} | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(f"{100 * m[k]:.1f} %" if k in m else "" for k in keys) + " |"
                  for name, m in rows.items()]
        lines.append("")
    return "\n".join(lines)
