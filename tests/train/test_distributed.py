"""Data-parallel training: 2 gloo processes (torchrun, through `uniopd train --nproc 2`) against
one process on the same global batch, resume across world sizes, a killed process.

Rollouts come from `external_backends:SeededSampler`, whose responses depend only on the
prompt, so both layouts see the same global batch; `even_length` grades them with both
outcomes in most groups, so global-scope margin shift really moves advantages.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import write_jsonl
from safetensors.torch import load_file

from uniopd.cli import main
from uniopd.train.checkpoint import find_resumable

TESTS = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_student_dir, tiny_teacher_dir):
    root = tmp_path_factory.mktemp("dp")
    data = write_jsonl(root / "train.jsonl", [{"id": f"p{i}", "domain": "arithmetic", "prompt": f"{i}+{i + 1}=",
                                               "answer": str(2 * i + 1), "verifier": "even_length"}
                                              for i in range(12)])
    args = [f"model.path={tiny_student_dir}", f"teachers.t.path={tiny_teacher_dir}", f"data.train={data}",
            "rollout.prompts_per_step=4", "rollout.n=2", "rollout.max_new_tokens=6", "trainer.micro_batch_size=4",
            "trainer.lr=1e-3", "logging.progress=false", "logging.tensorboard=false",
            "rollout.backend=external_backends:SeededSampler", "calibration.enabled=true",
            "calibration.scope=global"]
    return root, args


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def _train(args: list[str], out: Path, *, nproc: int = 1, resume: bool = False, timeout: float = 300) -> None:
    cmd = [sys.executable, "-m", "uniopd", "train", f"--nproc={nproc}", *(["--resume"] if resume else []),
           *args, f"trainer.output_dir={out}"]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(find_resumable(out) / "model.safetensors"))


def _assert_same_run(a: Path, b: Path, steps: list[int]) -> None:
    ra = {r["step"]: r for r in _rows(a)}
    rb = {r["step"]: r for r in _rows(b)}
    for step in steps:
        for key in ("loss", "teacher_kl", "update/tokens", "calib/mean_margin", "calib/order_consistency_rate"):
            assert ra[step][key] == pytest.approx(rb[step][key], abs=1e-5), (step, key)
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


@pytest.mark.parametrize("sharding", ["replicate", "shard"])
def test_two_processes_match_one_on_the_same_global_batch(setup, sharding):
    root, args = setup
    one, two = root / f"one_{sharding}", root / f"two_{sharding}"
    _train(args + ["trainer.steps=3"], one)
    _train(args + ["trainer.steps=3", f"trainer.student_sharding={sharding}"], two, nproc=2)
    _assert_same_run(one, two, [1, 2, 3])
    rows = _rows(two)
    # Global-scope calibration had two-outcome groups to work on, and shifted some of them.
    assert sum(r["calib/num_two_outcome_groups"] for r in rows) > 0
    assert any(r.get("calib/shifted_group_frac", 0) > 0 for r in rows)


def test_a_run_resumes_at_another_world_size_and_continues_identically(setup):
    root, args = setup
    straight = root / "straight"
    _train(args + ["trainer.steps=4", "trainer.save_every=2"], straight)
    for first, then, name in ((2, 1, "2to1"), (1, 2, "1to2")):
        out = root / name
        _train(args + ["trainer.steps=2", "trainer.save_every=2"], out, nproc=first)
        _train(args + ["trainer.steps=4", "trainer.save_every=2"], out, nproc=then, resume=True)
        assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4]
        _assert_same_run(straight, out, [3, 4])


def test_a_killed_process_ends_the_job_promptly_and_the_run_resumes(setup):
    import psutil

    root, args = setup
    out = root / "killed"
    cmd = [sys.executable, "-m", "uniopd", "train", "--nproc=2", *args, "trainer.steps=200", "trainer.save_every=1",
           f"trainer.output_dir={out}"]
    job = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while find_resumable(out) is None:
            assert job.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.5)
        victim = next(p for p in psutil.Process(job.pid).children(recursive=True)
                      if p.environ().get("RANK") == "1" and "uniopd" in " ".join(p.cmdline()))
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        job.wait(timeout=90)
        assert job.returncode != 0
        assert time.monotonic() - killed_at < 90
    finally:
        if job.poll() is None:
            job.kill()
    last = find_resumable(out)
    assert last is not None  # the last checkpoint verifies (hashes, manifest)
    step = int(last.name.split("_")[1])
    assert main(["train", *args, f"trainer.steps={step + 1}", f"trainer.output_dir={out}", "--resume"]) == 0
    assert _rows(out)[-1]["step"] == step + 1


def test_torchrun_processes_must_choose_the_data_parallel_strategy(setup, monkeypatch, capsys):
    _, args = setup
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", *args, "trainer.steps=1", "trainer.output_dir=/nonexistent/x"]) == 2
    assert "set trainer.strategy=data_parallel" in capsys.readouterr().err


def test_sigterm_to_the_launcher_saves_the_step_and_exits_like_one_process(setup):
    root, args = setup
    out = root / "term"
    cmd = [sys.executable, "-m", "uniopd", "train", "--nproc=2", *args, "trainer.steps=200", "trainer.save_every=0",
           f"trainer.output_dir={out}"]
    job = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
            assert job.poll() is None and time.monotonic() < deadline, "no step finished"
            time.sleep(0.5)
        job.send_signal(signal.SIGTERM)
        assert job.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        if job.poll() is None:
            job.kill()
    last = find_resumable(out)
    assert last is not None and int(last.name.split("_")[1]) == _rows(out)[-1]["step"]
