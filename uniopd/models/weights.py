"""Load weights saved by `save_pretrained` back into a live model (for --resume)."""

from __future__ import annotations

from pathlib import Path

import torch


def load_weights(model: torch.nn.Module, path: Path) -> None:
    path = Path(path)
    single = path / "model.safetensors"
    if single.exists():
        from safetensors.torch import load_file

        state = load_file(str(single), device=str(next(model.parameters()).device))
    else:
        from transformers.modeling_utils import load_sharded_checkpoint

        load_sharded_checkpoint(model, str(path), strict=False)
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    # save_pretrained drops tied copies (lm_head = embeddings); anything else missing is an error.
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if isinstance(getattr(model, "_tied_weights_keys", None), dict):
        tied = set(model._tied_weights_keys)
    real_missing = [k for k in missing if k not in tied]
    if real_missing or unexpected:
        raise RuntimeError(f"{single}: weights do not match the model: missing {real_missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
