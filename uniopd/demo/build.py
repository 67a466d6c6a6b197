"""Build the demo's data and models, offline.

Data: multi-digit addition from `reasoning-gym` ("Calculate 261 + 120." → "381").
Teacher: a 3-layer, 128-wide Llama trained by supervised fine-tuning to high accuracy.
Student: a 2-layer, 64-wide Llama given a short SFT warm-up, so it knows the answer format
but is often wrong. Both are ordinary `LlamaForCausalLM` + `PreTrainedTokenizerFast`
directories written by `save_pretrained`, loaded back through `uniopd.models.loading`
exactly like a real checkpoint. Built models are cached by a hash of their recipe.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from uniopd.data.records import PromptRecord
from uniopd.models.loading import LoadedModel
from uniopd.models.prompts import render_prompt
from uniopd.sft import SFTConfig, sft_train
from uniopd.utils import seed_everything


def default_cache_dir() -> Path:
    base = os.environ.get("UNIOPD_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "uniopd")
    return Path(base).expanduser()


def arithmetic_records(n: int, *, seed: int, digits: int = 2, prefix: str = "add") -> list[PromptRecord]:
    """n addition problems from reasoning-gym's basic_arithmetic generator."""
    import reasoning_gym as rg

    ds = rg.create_dataset("basic_arithmetic", min_terms=2, max_terms=2, min_digits=digits, max_digits=digits,
                           operators=("+",), allow_parentheses=False, allow_negation=False, size=n, seed=seed)
    return [PromptRecord(id=f"{prefix}-{seed}-{i}", domain="arithmetic", prompt=ds[i]["question"],
                         answer=str(ds[i]["answer"]), verifier="exact") for i in range(n)]


@dataclass
class TinyModelSpec:
    layers: int
    hidden: int
    heads: int
    sft_steps: int
    sft_examples: int
    lr: float
    batch_size: int = 128
    seed: int = 0

    def key(self, kind: str) -> str:
        blob = json.dumps({"kind": kind, "v": 1, **asdict(self)}, sort_keys=True)
        return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


TEACHER = TinyModelSpec(layers=3, hidden=128, heads=4, sft_steps=1400, sft_examples=40_000, lr=3e-3)
STUDENT = TinyModelSpec(layers=2, hidden=64, heads=4, sft_steps=150, sft_examples=20_000, lr=3e-3)


def tiny_llama(tokenizer, spec: TinyModelSpec) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=4 * spec.hidden,
                         num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                         num_key_value_heads=spec.heads, max_position_embeddings=64, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def sft_pairs(records: list[PromptRecord], tokenizer) -> list[tuple[list[int], list[int]]]:
    return [(render_prompt(tokenizer, r.prompt), tokenizer(r.answer, add_special_tokens=False)["input_ids"]
             + [tokenizer.eos_token_id]) for r in records]


def build_model(kind: str, spec: TinyModelSpec, cache_dir: Path, *, progress: bool = True,
                log=print) -> tuple[Path, bool]:
    """Directory of the built model; (path, True) when it came from the cache."""
    from uniopd.demo.tokenizer import char_tokenizer

    path = cache_dir / spec.key(kind)
    if (path / "config.json").exists() and (path / "built.ok").exists():
        return path, True
    log(f"building the {kind} ({spec.layers} layers, width {spec.hidden}, {spec.sft_steps} SFT steps)...")
    seed_everything(spec.seed)
    tokenizer = char_tokenizer()
    model = tiny_llama(tokenizer, spec)
    # Seeds far from the OPD/eval seeds so SFT data never overlaps the held-out prompts.
    pairs = sft_pairs(arithmetic_records(spec.sft_examples, seed=10_000 + spec.seed, prefix=f"sft-{kind}"),
                      tokenizer)
    sft_train(LoadedModel(model, tokenizer, kind), pairs,
              SFTConfig(steps=spec.sft_steps, batch_size=spec.batch_size, lr=spec.lr, seed=spec.seed),
              progress=progress)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "built.ok").write_text("ok\n")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path, False


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
