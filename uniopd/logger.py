"""Per-step metrics to JSONL and TensorBoard, and a progress bar with ETA."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from uniopd.config import LoggingConfig


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg: LoggingConfig, total_steps: int, start_step: int = 0):
        self.run_dir, self.cfg = Path(run_dir), cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
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
            self._jsonl.write(json.dumps({"step": step, **{k: _finite(v) for k, v in metrics.items()}}) + "\n")
            self._jsonl.flush()
        if self._tb:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
        if self._samples and samples:
            for s in samples[: self.cfg.log_samples]:
                self._samples.write(json.dumps({"step": step, **s}) + "\n")
            self._samples.flush()
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
