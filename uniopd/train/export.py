"""Export a training checkpoint, full or sharded, to a plain `save_pretrained` directory that
`uniopd eval`, transformers and vLLM load (`uniopd export`).

A full checkpoint already is one, less `trainer_state.pt` and `manifest.json`: its model and
tokenizer files are copied. A sharded one is read in this process without a process group
(`load_full_model_state`), put into the model class named by its config (built on the meta
device, so no random initialisation and no second copy of the weights) and saved with
`save_pretrained`. Either way the checkpoint's hashes are checked first and the output is
written under a temporary name and renamed into place, so OUT_DIR is whole or absent.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from uniopd.train.checkpoint import CheckpointError, checkpoint_format, find_resumable, verify_checkpoint
from uniopd.train.sharded_checkpoint import DCP_DIR, load_full_model_state
from uniopd.utils import fsync_dir

_TRAINING_ONLY = {"trainer_state.pt", "manifest.json"}


def resolve_checkpoint(source: Path) -> Path:
    """`source` itself when it is a checkpoint (has a manifest), else the newest verified
    checkpoint of the run directory `source`."""
    source = Path(source)
    if (source / "manifest.json").is_file():
        verify_checkpoint(source)
        return source
    if (source / "checkpoints").is_dir():
        found = find_resumable(source)
        if found is None:
            raise CheckpointError(f"{source}: no checkpoint under checkpoints/ verifies")
        return found
    raise CheckpointError(f"{source}: neither a checkpoint (no manifest.json) nor a run directory (no checkpoints/)")


def _build_model(path: Path, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise CheckpointError(f"{path / 'config.json'}: architectures={arch!r} is not a transformers model class")
    with torch.device("meta"):
        model = cls._from_config(config)
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)  # missing: tied copies, checked below
    if unexpected:
        raise CheckpointError(f"{path}: weights {unexpected[:5]} are not parameters of {arch}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # save_pretrained drops tied copies; they must point at the loaded tensor
    still_meta = [k for k, v in model.state_dict().items() if v.is_meta]
    if still_meta:
        raise CheckpointError(f"{path}: the checkpoint lacks weights {still_meta[:5]} of {arch}")
    return model


def _write(src: Path, tmp: Path, fmt: str) -> None:
    tmp.mkdir(parents=True)
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src)
        if not f.is_file() or str(rel) in _TRAINING_ONLY or rel.parts[0] == DCP_DIR:
            continue
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, tmp / rel)
    if fmt == "sharded":  # the config and tokenizer came with the copy; the weights come from the shards
        _build_model(src, load_full_model_state(src)).save_pretrained(tmp, safe_serialization=True)
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(tmp)


def export_checkpoint(source: Path, out_dir: Path) -> dict[str, Any]:
    """Write the model of checkpoint (or run directory) `source` to `out_dir`, which must not exist."""
    ckpt = resolve_checkpoint(Path(source))
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; export writes a new directory (remove it or choose another)")
    fmt = checkpoint_format(ckpt)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(ckpt, tmp, fmt)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out_dir.parent)
    return {"checkpoint": str(ckpt), "format": fmt, "out": str(out_dir)}
