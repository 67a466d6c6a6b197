"""Fault tolerance of `uniopd train`: SIGKILL at random moments, SIGTERM, corrupt and half-written checkpoints.

Every run here is compared bit for bit with one uninterrupted reference run of the same recipe: an
interrupted run resumed with `--resume` must end with exactly the same weights. Subprocesses are
only used where a real process has to die (SIGKILL, SIGTERM); resuming is done in-process through
`uniopd.cli.main`, which takes the same path as the console script.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import uniopd
from helpers import write_jsonl
from uniopd.train.checkpoint import find_resumable
from uniopd.cli import main

STEPS = 12
KILLS = 3
PROC_TIMEOUT_S = 240  # a child that makes no progress for this long fails the test instead of hanging it

_CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
              "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
              "PYTHONUNBUFFERED": "1"}


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """In-process runs set trainer.threads=1 globally; give the other tests their threads back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_student_dir, tiny_teacher_dir) -> Path:
    """One deterministic recipe (fixed seed, one thread, a checkpoint every step) shared by every run."""
    d = tmp_path_factory.mktemp("fault")
    rows = [{"id": f"p{i}", "domain": "arithmetic", "prompt": f"{i}+{i + 1}=", "answer": str(2 * i + 1)}
            for i in range(12)]
    data = write_jsonl(d / "train.jsonl", rows)
    cfg = {"model": {"path": str(tiny_student_dir)}, "teachers": {"t": {"path": str(tiny_teacher_dir)}},
           "data": {"train": str(data)},
           "rollout": {"prompts_per_step": 4, "n": 2, "max_new_tokens": 6},
           "trainer": {"steps": STEPS, "lr": 1e-3, "micro_batch_size": 4, "threads": 1, "seed": 3,
                       "device": "cpu", "save_every": 1, "keep_checkpoints": 2, "warmup_steps": 3,
                       "output_dir": str(d / "unused")},
           "logging": {"progress": False, "tensorboard": False}}
    path = d / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def reference(recipe) -> Path:
    """The uninterrupted run (in-process: bitwise the same as the CLI in a fresh process)."""
    out = recipe.parent / "reference"
    before = torch.get_num_threads()
    try:
        assert main(["train", "-c", str(recipe), f"trainer.output_dir={out}"]) == 0
    finally:
        torch.set_num_threads(before)
    return out


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{STEPS:06d}" / "model.safetensors"))


def _assert_same_weights(run: Path, reference: Path) -> None:
    a, b = _final_weights(reference), _final_weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs from the uninterrupted run"


def _resume_in_process(recipe: Path, run: Path, *extra: str) -> int:
    return main(["train", "-c", str(recipe), "--resume", f"trainer.output_dir={run}", *extra])


def _committed_steps(run: Path) -> list[int]:
    root = run / "checkpoints"
    return sorted(int(p.name[5:]) for p in root.glob("step_*")) if root.exists() else []


def _tmp_dirs(run: Path) -> list[str]:
    root = run / "checkpoints"
    return sorted(p.name for p in root.glob(".tmp_step_*")) if root.exists() else []


def _spawn(recipe: Path, run: Path, log_name: str, *extra: str, resume: bool = True) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "uniopd.cli", "train", "-c", str(recipe), *(["--resume"] if resume else []),
           f"trainer.output_dir={run}", *extra]
    run.mkdir(parents=True, exist_ok=True)
    log = open(run.parent / f"{run.name}.{log_name}.log", "w")
    try:
        # The child imports the same uniopd as this process, installed or not.
        src = str(Path(uniopd.__file__).resolve().parent.parent)
        pythonpath = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=run.parent,
                                env={**os.environ, **_CHILD_ENV, "PYTHONPATH": pythonpath})
    finally:
        log.close()  # the child holds its own copy


def _child_log(run: Path, log_name: str) -> str:
    return (run.parent / f"{run.name}.{log_name}.log").read_text()


def _wait_until(proc: subprocess.Popen, run: Path, cond, what: str) -> bool:
    """Poll `cond` (every ms once training has started) until it holds (True) or the child exits (False)."""
    deadline = time.monotonic() + PROC_TIMEOUT_S
    while proc.poll() is None:
        started = (run / "metrics.jsonl").exists()
        if started and cond():
            return True
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"child made no progress within {PROC_TIMEOUT_S}s while waiting for {what}")
        time.sleep(0.001 if started else 0.02)
    return False


def _resume_point(run: Path) -> int:
    ckpt = find_resumable(run)
    return 0 if ckpt is None else int(ckpt.name[5:])


def test_sigkill_at_random_moments_then_resume_matches_uninterrupted_run(recipe, reference, tmp_path):
    rng = random.Random(20240607)
    run = tmp_path / "killed"
    history = []
    for attempt in range(KILLS):
        start = _resume_point(run)
        proc = _spawn(recipe, run, f"attempt{attempt}")
        if attempt == 0:
            # Mid-write: the moment a checkpoint's temporary directory appears (before its rename).
            what = "a checkpoint being written"
            hit = _wait_until(proc, run, lambda: bool(_tmp_dirs(run)), what)
        else:
            # Anywhere: some steps past the resume point, then a random fraction of a step later.
            target = start + rng.randint(1, 2)
            what = f"checkpoint step {target}"
            hit = _wait_until(proc, run, lambda: max(_committed_steps(run), default=0) >= target, what)
            time.sleep(rng.uniform(0.0, 0.06))
        assert hit, f"attempt {attempt}: the run ended before {what}:\n{_child_log(run, f'attempt{attempt}')}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL, _child_log(run, f"attempt{attempt}")
        history.append((attempt, start, _committed_steps(run), _tmp_dirs(run)))
        # Whatever the kill interrupted, what --resume would pick verifies and is not a temp dir.
        ckpt = find_resumable(run)
        assert ckpt is None or ckpt.name.startswith("step_"), history

    assert _resume_point(run) < STEPS, history  # the kills really interrupted the run
    assert _resume_in_process(recipe, run) == 0
    _assert_same_weights(run, reference)
    assert _committed_steps(run) == [STEPS - 1, STEPS]
    assert _tmp_dirs(run) == [], history  # every half-written checkpoint was rewritten by the resumed run


def test_sigterm_finishes_the_step_saves_and_exits_143_then_resume_continues(recipe, reference, tmp_path, caplog):
    run = tmp_path / "termed"
    # Far more steps than the recipe's, so the signal always lands inside the loop.
    proc = _spawn(recipe, run, "term", "trainer.steps=1000", resume=False)
    assert _wait_until(proc, run, lambda: bool(_committed_steps(run)), "the first checkpoint")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    out = _child_log(run, "term")
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "signal 15: finishing this step" in out
    result = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    stopped_at = result["step"]
    assert result["stopped_by_signal"] == signal.SIGTERM and 1 <= stopped_at < STEPS, result
    assert find_resumable(run).name == f"step_{stopped_at:06d}"
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:06d}"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, stopped_at + 1))  # the interrupted step was finished

    caplog.set_level(logging.INFO, logger="uniopd")
    assert _resume_in_process(recipe, run) == 0
    assert f"at step {stopped_at}" in caplog.text
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    _assert_same_weights(run, reference)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "flipped_weight_byte": lambda c: _flip_byte(c / "model.safetensors"),
    "no_manifest": lambda c: (c / "manifest.json").unlink(),
    "torn_manifest": lambda c: (c / "manifest.json").write_text((c / "manifest.json").read_text()[:37]),
    "manifest_not_a_table": lambda c: (c / "manifest.json").write_text("[]"),
    "empty_manifest": lambda c: (c / "manifest.json").write_text('{"step": 12, "files": {}}'),
    "no_trainer_state": lambda c: (c / "trainer_state.pt").unlink(),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_latest_checkpoint_is_refused_and_the_previous_one_resumes(recipe, reference, tmp_path, caplog,
                                                                            corruption):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    latest = run / "checkpoints" / f"step_{STEPS:06d}"
    CORRUPTIONS[corruption](latest)

    assert find_resumable(run) == run / "checkpoints" / f"step_{STEPS - 1:06d}"
    assert "skipping checkpoint" in caplog.text and latest.name in caplog.text
    caplog.clear()
    caplog.set_level(logging.INFO, logger="uniopd")
    assert _resume_in_process(recipe, run) == 0
    assert f"at step {STEPS - 1}" in caplog.text and "skipping checkpoint" in caplog.text
    _assert_same_weights(run, reference)  # the refused step was retrained and rewritten, identically


def test_garbage_latest_pointer_falls_back_to_the_newest_good_checkpoint(reference, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    for junk in (b"\xff\xfe\x00garbage", b"../../somewhere/else", b"", b"step_999999"):
        (run / "checkpoints" / "latest").write_bytes(junk)
        assert find_resumable(run) == run / "checkpoints" / f"step_{STEPS:06d}", junk


def test_leftover_tmp_checkpoint_dirs_are_ignored(recipe, reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    root = run / "checkpoints"
    # A crash just before the rename of step 12: a complete, self-consistent temp dir; `latest` still on 11.
    (root / f"step_{STEPS:06d}").rename(root / f".tmp_step_{STEPS:06d}")
    (root / "latest").write_text(f"step_{STEPS - 1:06d}\n")
    # And an older crash half-way through writing a later step: a truncated weights file, no manifest.
    half = root / f".tmp_step_{STEPS + 1:06d}"
    half.mkdir()
    (half / "model.safetensors").write_bytes((root / f".tmp_step_{STEPS:06d}" / "model.safetensors").read_bytes()[:100])

    assert find_resumable(run) == root / f"step_{STEPS - 1:06d}"
    # Nothing committed yet at all: the temp dir alone is not resumable.
    lone = tmp_path / "lone"
    (lone / "checkpoints").mkdir(parents=True)
    shutil.copytree(root / f".tmp_step_{STEPS:06d}", lone / "checkpoints" / ".tmp_step_000001")
    assert find_resumable(lone) is None

    assert _resume_in_process(recipe, run) == 0
    _assert_same_weights(run, reference)
    assert _tmp_dirs(run) == [half.name]  # step 12's was rewritten and renamed; the stray one is left alone
    assert find_resumable(run) == root / f"step_{STEPS:06d}"


def test_resume_does_not_duplicate_metrics_rows_of_lost_steps(recipe, reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    root = run / "checkpoints"
    shutil.rmtree(root / f"step_{STEPS:06d}")  # killed after logging step 12, before its checkpoint landed
    (root / "latest").write_text(f"step_{STEPS - 1:06d}\n")
    assert _resume_in_process(recipe, run) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
