"""Test helpers: tiny random Llama models saved with save_pretrained, prompt files, configs."""

from __future__ import annotations

import contextlib
import json
import signal
from pathlib import Path

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from uniopd.demo.tokenizer import char_tokenizer


def make_tiny_model(path: Path, *, layers: int = 2, hidden: int = 32, seed: int = 0, tokenizer=None,
                    vocab_size: int | None = None) -> Path:
    """vocab_size: embedding / lm_head rows (default len(tokenizer)); larger pads them, as real
    checkpoints do (Qwen2.5-1.5B: 151,936 rows, 7B: 152,064, for a 151,665-token tokenizer)."""
    tok = tokenizer or char_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size or len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


# In-memory models of the four Llama-style families the lean decode step and prefix sharing support.
DIMS = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=2)

FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**DIMS, attention_bias=True, rope_theta=500.0)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**DIMS, sliding_window=None)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**DIMS, tie_word_embeddings=True)),  # q/k/v biases
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**DIMS, head_dim=24)),  # per-head q/k norms, head_dim != H/heads
}


def family_model(family: str) -> torch.nn.Module:
    """A random model of `family` in eval mode, its norms and biases spread away from 1 and 0
    so every term of a forward matters."""
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_run_config(student: Path, teacher: Path, data: Path, out: Path, **overrides):
    from uniopd.config import load_config

    base = [f"model.path={student}", f"teachers.t.path={teacher}", f"data.train={data}",
            f"trainer.output_dir={out}", "rollout.prompts_per_step=4", "rollout.n=2",
            "rollout.max_new_tokens=6", "trainer.micro_batch_size=4", "trainer.lr=1e-3",
            "trainer.steps=2", "logging.progress=false", "logging.tensorboard=false"]
    return load_config(None, base + [f"{k}={v}" for k, v in overrides.items()])


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) when the body blocks, e.g. opening a FIFO."""
    def _alarm(signum, frame):
        raise TimeoutError(f"blocked for more than {seconds}s")

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
