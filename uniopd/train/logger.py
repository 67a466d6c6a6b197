"""Per-step metrics to JSONL and TensorBoard, and a progress bar with ETA."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from uniopd.config import LoggingConfig
from uniopd.utils import atomic_write_text


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


def _truncate_after(path: Path, step: int) -> None:
    """Keep only rows of steps <= `step` (and no torn last line).

    A run killed after logging step N but before checkpointing it resumes at an earlier
    step; without this, step N would appear twice. TensorBoard does the same (purge_step).
    """
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line + "\n")
        except (ValueError, AttributeError):
            pass
    atomic_write_text(path, "".join(keep))


def _append(fh: Any, text: str) -> None:
    try:
        fh.write(text)
        fh.flush()
    except OSError as exc:  # a full disk: name the file (a bare write error names none)
        raise OSError(exc.errno, f"cannot write {fh.name}: {exc.strerror}") from exc


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg: LoggingConfig, total_steps: int, start_step: int = 0):
        self.run_dir, self.cfg = Path(run_dir), cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        for name in ("metrics.jsonl", "samples.jsonl"):
            _truncate_after(self.run_dir / name, start_step)
        self._jsonl = open(self.metrics_path, "a") if cfg.jsonl else None
        self._samples = open(self.run_dir / "samples.jsonl", "a") if cfg.log_samples else None
        self._tb = None
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1)
            except ImportError:  # tensorboard is a dependency; stay usable if it was removed
                print("uniopd: tensorboard not installed, skipping TensorBoard logs", file=sys.stderr)
        self._bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True, file=sys.stderr)

    def log(self, step: int, metrics: dict[str, Any], samples: list[dict[str, Any]] | None = None) -> None:
        if self._jsonl:
            _append(self._jsonl, json.dumps({"step": step, **{k: _finite(v) for k, v in metrics.items()}}) + "\n")
        if self._tb:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
        if self._samples and samples:
            _append(self._samples, "".join(json.dumps({"step": step, **s}) + "\n"
                                           for s in samples[: self.cfg.log_samples]))
        if self._bar:
            self._bar.update(1)
            keys = ("loss", "teacher_kl", "acc", "resp_len")
            self._bar.set_postfix({k: f"{metrics[k]:.3g}" for k in keys if isinstance(metrics.get(k), float)})

    def close(self) -> None:
        for h in (self._jsonl, self._samples):
            if h:
                h.close()
        if self._tb:
            self._tb.close()
        if self._bar:
            self._bar.close()


class NullLogger:
    """What processes other than the first use: they log nothing, and touch no file."""

    def __init__(self, run_dir: Path):
        self.metrics_path = Path(run_dir) / "metrics.jsonl"

    def log(self, step: int, metrics: dict[str, Any], samples: list[dict[str, Any]] | None = None) -> None:
        pass

    def close(self) -> None:
        pass
