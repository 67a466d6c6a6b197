"""Atomic, verified checkpoints.

A checkpoint is a directory `step_000050/` holding the model (`save_pretrained`,
safetensors), `trainer_state.pt` (optimizer, scheduler, RNG, sampler position, step) and
`manifest.json` with the SHA-256 of every file. It is written under a temporary name,
fsynced and renamed into place, and `latest` is replaced atomically afterwards, so a crash
at any moment leaves the previous checkpoint as the one `--resume` finds. Loading checks
every hash; a corrupt or partial checkpoint is refused and the previous one is tried.

A data-parallel run with a sharded student writes the `sharded` format instead
(`uniopd.train.sharded_checkpoint`): the same directory, manifest and `trainer_state.pt`, but
the model and optimizer as torch.distributed.checkpoint files under `dcp/`, each process
writing its own shards. `uniopd export` turns either format into a plain model directory.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from uniopd.utils import atomic_write_text, fsync_dir

log = logging.getLogger(__name__)


SHARDED_METADATA = "dcp/.metadata"  # the index of a sharded checkpoint's DCP files


class CheckpointError(RuntimeError):
    pass


class RunDirError(OSError):
    """The run directory cannot be made or written (disk full, read-only, not a directory);
    the message names the path. An OSError, so the command line reports it in one line."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def prepare_run_dir(path: str | os.PathLike[str], key: str = "trainer.output_dir") -> Path:
    """Create the run directory, or fail now, naming `key`, if it cannot hold a run."""
    run_dir = Path(path)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RunDirError(errno.ENOTDIR, f"{key}: {run_dir} exists and is not a directory") from None
    except OSError as exc:
        raise RunDirError(exc.errno, f"{key}: cannot create {run_dir}: {exc.strerror or exc}") from None
    # access(2) reports a read-only file system even to root, who passes every permission check.
    if not os.access(run_dir, os.W_OK | os.X_OK):
        ro = os.statvfs(run_dir).f_flag & os.ST_RDONLY
        raise RunDirError(errno.EROFS if ro else errno.EACCES,
                          f"{key}: {run_dir} is not writable" + (" (a read-only file system)" if ro else ""))
    return run_dir


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, tokenizer: Any,
                    state: dict[str, Any], **kwargs: Any) -> Path:
    """Write checkpoint `step` (see `_save_checkpoint`); a failed write raises RunDirError."""
    try:
        return _save_checkpoint(run_dir, step, model, tokenizer, state, **kwargs)
    except Exception as exc:
        # Disk full, read-only, quota: torch and safetensors raise their own types for it. The
        # half-written temp dir goes (it frees the space); `latest` and older checkpoints are
        # untouched, so --resume still finds the previous one.
        shutil.rmtree(Path(run_dir) / "checkpoints" / f".tmp_step_{step:06d}", ignore_errors=True)
        final = Path(run_dir) / "checkpoints" / f"step_{step:06d}"
        raise RunDirError(getattr(exc, "errno", None) or errno.EIO,
                          f"cannot write checkpoint {final} ({type(exc).__name__}: {exc}); the previous "
                          f"checkpoint is kept") from exc


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, tokenizer: Any,
                     state: dict[str, Any], *, keep: int = 2, state_dict: dict[str, Any] | None = None) -> Path:
    """state_dict: the model's full weights when the live model holds shards of them."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:06d}"
    tmp = ckpt_root / f".tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save(state, tmp / "trainer_state.pt")
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    for p in files:
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
    return finish_checkpoint(tmp, final, {str(p.relative_to(tmp)): sha256_file(p) for p in files}, keep=keep)


def finish_checkpoint(tmp: Path, final: Path, digests: dict[str, str], *, keep: int,
                      extra: dict[str, Any] | None = None) -> Path:
    """Make the fully written and fsynced `tmp` the checkpoint `final`: the manifest last, then
    the rename, then `latest`, then pruning. extra: more manifest fields (the sharded format)."""
    ckpt_root = final.parent
    step = int(final.name.split("_")[1])
    manifest = {"step": step, **(extra or {}), "files": digests}
    with open(tmp / "manifest.json", "w") as fh:  # fsynced too: a renamed dir must never hold a torn manifest
        fh.write(json.dumps(manifest, indent=1))
        fh.flush()
        os.fsync(fh.fileno())
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_dir(ckpt_root)
    atomic_write_text(ckpt_root / "latest", final.name + "\n")
    for old in sorted(ckpt_root.glob("step_*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(path: Path) -> dict[str, Any]:
    manifest_path = Path(path) / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no manifest.json (incomplete checkpoint)")
    try:
        manifest = json.loads(manifest_path.read_bytes())
    except (OSError, ValueError) as exc:  # ValueError covers JSONDecodeError and UnicodeDecodeError
        raise CheckpointError(f"{path}: manifest.json is unreadable (corrupt): {exc}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise CheckpointError(f"{path}: manifest.json has no valid 'files' table (corrupt)")
    # The sharded format (uniopd.train.sharded_checkpoint) keeps its weights in DCP files.
    sharded = manifest.get("format") == "sharded"
    has_weights = SHARDED_METADATA in files if sharded else any(str(rel).endswith(".safetensors") for rel in files)
    if "trainer_state.pt" not in files or not has_weights:
        raise CheckpointError(f"{path}: manifest.json does not list the weights and trainer_state.pt (corrupt)")
    for rel, digest in files.items():
        f = Path(path) / rel
        if not f.is_file():
            raise CheckpointError(f"{path}: {rel} is missing")
        try:
            actual = sha256_file(f)
        except OSError as exc:
            raise CheckpointError(f"{path}: {rel} is unreadable: {exc}") from None
        if actual != digest:
            raise CheckpointError(f"{path}: {rel} does not match its recorded SHA-256 (corrupt)")
    return manifest


def find_resumable(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies, trying `latest` first, then older ones."""
    ckpt_root = Path(run_dir) / "checkpoints"
    if not ckpt_root.exists():
        return None
    candidates = sorted(ckpt_root.glob("step_*"), reverse=True)
    latest = ckpt_root / "latest"
    try:
        named = latest.read_bytes().decode("utf-8", "replace").strip()
    except OSError:  # absent (first checkpoint not finished) or unreadable: fall back to the newest
        named = ""
    by_name = {c.name: c for c in candidates}
    if named in by_name:  # `latest` can only reorder real checkpoints, never name a path of its own
        candidates = [by_name[named]] + [c for c in candidates if c.name != named]
    elif named:
        log.warning("skipping checkpoint: %s names %r, which is not a checkpoint here", latest, named[:80])
    for cand in candidates:
        try:
            verify_checkpoint(cand)
            return cand
        except CheckpointError as exc:
            log.warning("skipping checkpoint: %s", exc)
    return None


def checkpoint_format(path: Path) -> str:
    """`full` (save_pretrained weights, optimizer in trainer_state.pt) or `sharded` (DCP files)."""
    manifest = json.loads((Path(path) / "manifest.json").read_bytes())
    return "sharded" if manifest.get("format") == "sharded" else "full"


def load_trainer_state(path: Path) -> dict[str, Any]:
    return torch.load(Path(path) / "trainer_state.pt", weights_only=False)
