"""The model families uniopd's own fast paths know: the lean decode step
(`uniopd.cpu.lean`) and shared prompt prefixes (`uniopd.models.prefix`). Both rely on
a Llama-style layer and on full attention in every layer (a per-layer key/value cache that
holds every position); anything else runs through the model's own forward."""

from __future__ import annotations

LLAMA_STYLE_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def full_attention_llama_reason(cfg) -> str | None:
    """Why a model config is not a Llama-style family with full attention in every layer, or None."""
    mtype = getattr(cfg, "model_type", None)
    if mtype not in LLAMA_STYLE_TYPES:
        return f"model_type {mtype!r} is not one of {LLAMA_STYLE_TYPES}"
    if getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True):
        return "sliding-window attention"
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or ())):
        return "layers other than full attention"
    return None
