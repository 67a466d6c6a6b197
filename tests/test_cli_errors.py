"""`uniopd train` when the environment is hostile: a full disk while checkpointing, a read-only run
directory, `output_dir=/dev/null`, a `.gz` that is not gzip, a FIFO as the config. Each ends with exit
code 2 and one `uniopd train: error:` line naming the path, never a traceback, and no checkpoint is
ever half-written: --resume finds the last good one.

A full and a read-only disk are real ones (a small tmpfs) where this process may mount (root);
elsewhere those tests skip, and a simulated ENOSPC covers the checkpoint path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from helpers import deadline

from uniopd.cli import main
from uniopd.train.checkpoint import find_resumable


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def recipe(tmp_path, tiny_student_dir, tiny_teacher_dir, arithmetic_file) -> Path:
    cfg = {"model": {"path": str(tiny_student_dir)}, "teachers": {"t": {"path": str(tiny_teacher_dir)}},
           "data": {"train": str(arithmetic_file)},
           "rollout": {"prompts_per_step": 2, "n": 2, "max_new_tokens": 4},
           "trainer": {"steps": 1, "lr": 1e-3, "micro_batch_size": 4, "threads": 1, "device": "cpu",
                       "save_every": 1, "output_dir": str(tmp_path / "unused")},
           "logging": {"progress": False, "tensorboard": False}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("uniopd train: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _tmp_dirs(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob(".tmp_step_*"))


@contextlib.contextmanager
def _tmpfs(path: Path, size: str):
    path.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True,
                       capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def _fill(disk: Path, leave: int) -> None:
    """Take all but `leave` bytes of the file system."""
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    with open(disk / "filler", "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))


def test_disk_full_while_checkpointing_exits_2_and_keeps_the_previous_checkpoint(recipe, tmp_path, capsys):
    with _tmpfs(tmp_path / "disk", "8m") as disk:
        run = disk / "run"
        assert main(["train", "-c", str(recipe), f"trainer.output_dir={run}"]) == 0
        assert find_resumable(run).name == "step_000001"
        _fill(disk, leave=48 << 10)  # room for the metrics row, not for the weights
        capsys.readouterr()
        assert main(["train", "-c", str(recipe), "--resume", f"trainer.output_dir={run}",
                     "trainer.steps=2"]) == 2
        line = _one_error_line(capsys)
        assert f"cannot write checkpoint {run}/checkpoints/step_000002" in line
        assert "No space left on device" in line or "file write failed" in line, line
        assert find_resumable(run).name == "step_000001" and _tmp_dirs(run) == []
        assert (run / "checkpoints" / "latest").read_text().strip() == "step_000001"
        (disk / "filler").unlink()  # space back: the run continues from the kept checkpoint
        assert main(["train", "-c", str(recipe), "--resume", f"trainer.output_dir={run}",
                     "trainer.steps=2"]) == 0
        assert find_resumable(run).name == "step_000002"


def test_a_failed_checkpoint_write_is_one_error_line_even_without_mount(recipe, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("uniopd.train.checkpoint.torch.save", no_space)
    assert main(["train", "-c", str(recipe), f"trainer.output_dir={run}"]) == 2
    line = _one_error_line(capsys)
    assert f"cannot write checkpoint {run}/checkpoints/step_000001" in line and "No space left" in line
    assert find_resumable(run) is None and _tmp_dirs(run) == []


def test_a_read_only_run_directory_exits_2_naming_it(recipe, tmp_path, capsys):
    with _tmpfs(tmp_path / "disk", "8m") as disk:
        run = disk / "run"
        assert main(["train", "-c", str(recipe), f"trainer.output_dir={run}"]) == 0
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True, capture_output=True, timeout=30)
        capsys.readouterr()
        assert main(["train", "-c", str(recipe), "--resume", f"trainer.output_dir={run}",
                     "trainer.steps=2"]) == 2
        line = _one_error_line(capsys)
        assert f"trainer.output_dir: {run} is not writable (a read-only file system)" in line
        assert find_resumable(run).name == "step_000001"
        # A run directory still to be made under a read-only parent: the same one line.
        assert main(["train", "-c", str(recipe), f"trainer.output_dir={disk}/new/run"]) == 2
        assert f"trainer.output_dir: cannot create {disk}/new/run" in _one_error_line(capsys)


@pytest.mark.parametrize("target", ["/dev/null", "file"])
def test_an_output_dir_that_is_not_a_directory_exits_2_naming_it(recipe, tmp_path, capsys, target):
    if target == "file":
        target = tmp_path / "a_file"
        target.write_text("keep me")
    assert main(["train", "-c", str(recipe), f"trainer.output_dir={target}"]) == 2
    assert f"trainer.output_dir: {target} exists and is not a directory" in _one_error_line(capsys)
    if not str(target).startswith("/dev"):
        assert target.read_text() == "keep me"


def test_a_gz_data_file_that_is_not_gzip_exits_2_naming_it(recipe, tmp_path, capsys):
    data = tmp_path / "train.jsonl.gz"
    data.write_text('{"id": "a", "domain": "arithmetic", "prompt": "1+1=", "answer": "2"}\n')
    assert main(["train", "-c", str(recipe), f"data.train={data}", f"trainer.output_dir={tmp_path / 'run'}"]) == 2
    assert f"data.train: {data}: not a valid gzip file" in _one_error_line(capsys)


def test_a_fifo_as_config_or_data_exits_2_at_once(recipe, tmp_path, capsys):
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    with deadline(60):
        assert main(["train", "-c", str(fifo)]) == 2
    assert f"config file {fifo}: is a FIFO" in _one_error_line(capsys)
    data = tmp_path / "pipe.jsonl"
    os.mkfifo(data)
    with deadline(120):
        assert main(["train", "-c", str(recipe), f"data.train={data}",
                     f"trainer.output_dir={tmp_path / 'run'}"]) == 2
    assert f"data.train: prompt file {data}: is a FIFO" in _one_error_line(capsys)
