"""Sharded checkpoints with torch.distributed.checkpoint (DCP), for a student too large to
gather on one process (`trainer.checkpoint_format`; `auto` picks this format for a
data-parallel run with `trainer.student_sharding: shard`).

`checkpoints/step_N/` in this format:
  dcp/               the model and optimizer state, {"model": ..., "optim": ...} as DCP files:
                     each process writes its own shards and process 0 the index (`.metadata`);
                     no process ever holds the full state
  config.json, generation_config.json, tokenizer files   (process 0; what `uniopd export` needs)
  trainer_state.pt   step, scheduler, RNG, sampler position (process 0; the full format's, less the optimizer)
  manifest.json      format `sharded`, the world size, the SHA-256 of every file, written last

It is as atomic as the full format: everything goes into `.tmp_step_N/`; every process writes,
fsyncs and hashes its share of the files; only when all of them have succeeded does process 0
write the manifest and rename the directory into place (`finish_checkpoint`), so a crash at any
moment leaves a directory `find_resumable` skips. A failure on any process is reported to every
process, all of them raise, and the temporary directory is removed. A run resumes from it at
any world size, DCP resharding on load, and in one process without a process group. Every
process must see the run directory on one shared file system (as DCP's FileSystemWriter assumes).
"""

from __future__ import annotations

import errno
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from uniopd.train.checkpoint import CheckpointError, RunDirError, finish_checkpoint, sha256_file
from uniopd.utils import fsync_dir

DCP_DIR = "dcp"
_MODEL_KEY, _OPTIM_KEY = "model", "optim"


class _SaveFailed(RuntimeError):
    def __init__(self, message: str, errno_: int | None):
        super().__init__(message)
        self.errno = errno_


def _agree(strategy: Any, fn: Callable[[], Any]) -> list[Any]:
    """Run `fn` on this process and return every process's result; if it failed on any
    process, raise on every process (so none waits forever in the next collective)."""
    try:
        value, error = fn(), None
    except Exception as exc:  # reported to every process below, then raised there
        value, error = None, (f"{type(exc).__name__}: {exc}", getattr(exc, "errno", None))
    results = strategy.all_gather_objects((value, error))
    errors = [(f"process {rank}: {err[0]}", err[1]) for rank, (_, err) in enumerate(results) if err]
    if errors:
        raise _SaveFailed("; ".join(m for m, _ in errors), next((e for _, e in errors if e), None))
    return [v for v, _ in results]


def _state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """This process's shards (sharded parameters as DTensors), keyed by parameter name so any
    world size can read them back."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    out = {_MODEL_KEY: get_model_state_dict(model)}
    if optimizer is not None:
        out[_OPTIM_KEY] = get_optimizer_state_dict(model, optimizer)
    return out


def _write_side_files(tmp: Path, model: torch.nn.Module, tokenizer: Any, state: dict[str, Any]) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / DCP_DIR).mkdir(parents=True)
    # save_pretrained records the class the same way; export rebuilds the model from it.
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save(state, tmp / "trainer_state.pt")


def _hash_share(tmp: Path, rank: int, world_size: int) -> dict[str, str]:
    """fsync and hash every world_size-th file from `rank` on: the hashing is spread like the writing."""
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    out = {}
    for p in files[rank::world_size]:
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
        out[str(p.relative_to(tmp))] = sha256_file(p)
    return out


def save_sharded(run_dir: Path, step: int, model: torch.nn.Module, tokenizer: Any, state: dict[str, Any], *,
                 keep: int, optimizer: torch.optim.Optimizer | None, strategy: Any) -> Path:
    """Write checkpoint `step` in the sharded format; every process calls it. `state` is the
    trainer state without the optimizer (its shards go to the DCP files)."""
    import torch.distributed.checkpoint as dcp

    ckpt_root = Path(run_dir) / "checkpoints"
    final = ckpt_root / f"step_{step:06d}"
    tmp = ckpt_root / f".tmp_step_{step:06d}"
    try:
        _agree(strategy, lambda: _write_side_files(tmp, model, tokenizer, state) if strategy.is_main else None)
        # A failed write on one process is raised on every process by DCP itself.
        _agree(strategy, lambda: dcp.save(_state_dicts(model, optimizer),
                                          storage_writer=dcp.FileSystemWriter(str(tmp / DCP_DIR))))
        shares = _agree(strategy, lambda: _hash_share(tmp, strategy.rank, strategy.world_size))
        digests = {k: v for share in shares for k, v in share.items()}

        def finish() -> Path | None:
            if not strategy.is_main:
                return None
            fsync_dir(tmp / DCP_DIR)
            return finish_checkpoint(tmp, final, digests, keep=keep,
                                     extra={"format": "sharded", "world_size": strategy.world_size})

        return _agree(strategy, finish)[0]
    except Exception as exc:
        if strategy.is_main:  # frees the space; `latest` and older checkpoints are untouched
            shutil.rmtree(tmp, ignore_errors=True)
        what = str(exc) if isinstance(exc, _SaveFailed) else f"{type(exc).__name__}: {exc}"
        raise RunDirError(getattr(exc, "errno", None) or errno.EIO,
                          f"cannot write checkpoint {final} ({what}); the previous checkpoint is kept") from exc


def load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 no_dist: bool) -> None:
    """Load a sharded checkpoint's model (and optimizer) state into the live ones, resharded to
    this run's layout. no_dist: one process without a process group."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    sd = _state_dicts(model, optimizer)
    _dcp_load(sd, Path(path) / DCP_DIR, no_dist=no_dist)
    set_model_state_dict(model, sd[_MODEL_KEY])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, sd[_OPTIM_KEY])


def load_full_model_state(path: Path) -> dict[str, torch.Tensor]:
    """The whole model state of a sharded checkpoint in this process, by parameter name, read
    without a process group (the optimizer's shards are not read)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(Path(path) / DCP_DIR))
    prefix = _MODEL_KEY + "."
    sd: dict[str, torch.Tensor] = {}
    for key, item in reader.read_metadata().state_dict_metadata.items():
        if not key.startswith(prefix):
            continue
        if not isinstance(item, TensorStorageMetadata):
            raise CheckpointError(f"{path}: model entry {key[len(prefix):]!r} is not a tensor; cannot export it")
        sd[key[len(prefix):]] = torch.empty(item.size, dtype=item.properties.dtype)
    if not sd:
        raise CheckpointError(f"{path}: {DCP_DIR}/ holds no model state")
    _dcp_load({_MODEL_KEY: sd}, Path(path) / DCP_DIR, no_dist=True)
    return sd


def _dcp_load(sd: dict[str, Any], dcp_dir: Path, *, no_dist: bool) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        # DCP warns that it "assumes" one process even when told so with no_dist=True.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.load(sd, storage_reader=dcp.FileSystemReader(str(dcp_dir)), no_dist=no_dist)
