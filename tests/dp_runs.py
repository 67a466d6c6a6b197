"""Data-parallel training runs for the tests: the CLI in subprocesses (1 or N gloo processes),
their metrics, their final weights in either checkpoint format, and the comparison of two runs;
and `OneProcess`, a stand-in strategy for writing sharded checkpoints in the test process.

Rollouts come from `external_backends:SeededSampler`, whose responses depend only on the
prompt, so every process layout sees the same global batch; `even_length` grades them with
both outcomes in most groups, so global-scope margin shift really moves advantages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import write_jsonl
from safetensors.torch import load_file

from uniopd.train.checkpoint import checkpoint_format, find_resumable

TESTS = Path(__file__).resolve().parent


class OneProcess:
    """The strategy surface `save_sharded` uses, for one process without a process group."""

    rank, world_size, is_main = 0, 1, True

    def all_gather_objects(self, obj):
        return [obj]


def dp_args(root: Path, student_dir: Path, teacher_dir: Path) -> list[str]:
    data = write_jsonl(root / "train.jsonl", [{"id": f"p{i}", "domain": "arithmetic", "prompt": f"{i}+{i + 1}=",
                                               "answer": str(2 * i + 1), "verifier": "even_length"}
                                              for i in range(12)])
    return [f"model.path={student_dir}", f"teachers.t.path={teacher_dir}", f"data.train={data}",
            "rollout.prompts_per_step=4", "rollout.n=2", "rollout.max_new_tokens=6", "trainer.micro_batch_size=4",
            "trainer.lr=1e-3", "logging.progress=false", "logging.tensorboard=false",
            "rollout.backend=external_backends:SeededSampler", "calibration.enabled=true",
            "calibration.scope=global"]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def train(args: list[str], out: Path, *, nproc: int = 1, resume: bool = False, torchrun: bool = False,
          timeout: float = 300) -> subprocess.CompletedProcess:
    """nproc > 1 goes through `uniopd train --nproc`; torchrun: launch under torchrun even for one
    process (a data-parallel run of world size 1)."""
    tail = ["train", *(["--resume"] if resume else []), *args, f"trainer.output_dir={out}"]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "uniopd", *tail, "trainer.strategy=data_parallel"]
    else:
        cmd = [sys.executable, "-m", "uniopd", *tail[:1], f"--nproc={nproc}", *tail[1:]]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    """The newest checkpoint's weights as a save_pretrained directory holds them (a sharded
    checkpoint goes through `uniopd export`)."""
    from uniopd.train.export import export_checkpoint

    ckpt = find_resumable(out)
    if checkpoint_format(ckpt) == "full":
        return load_file(str(ckpt / "model.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        export_checkpoint(ckpt, Path(tmp) / "model")
        return load_file(str(Path(tmp) / "model" / "model.safetensors"))


def assert_same_run(a: Path, b: Path, steps: list[int]) -> None:
    ra = {r["step"]: r for r in metric_rows(a)}
    rb = {r["step"]: r for r in metric_rows(b)}
    for step in steps:
        for key in ("loss", "teacher_kl", "update/tokens", "calib/mean_margin", "calib/order_consistency_rate"):
            assert ra[step][key] == pytest.approx(rb[step][key], abs=1e-5), (step, key)
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5
