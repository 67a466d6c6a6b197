"""Sharded (torch.distributed.checkpoint) checkpoints: each of 2 gloo processes writes its own
shards; a run resumes from them in 2 processes, in 1 process without a process group, and a
1-process sharded checkpoint resumes in 2 (DCP resharding), each continuing as an uninterrupted
run; half-written or damaged ones are never resumed; a failed write keeps the previous one."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from dp_runs import OneProcess, assert_same_run, dp_args, metric_rows, train
from transformers import AutoModelForCausalLM

from uniopd.cli import main
from uniopd.train.checkpoint import RunDirError, checkpoint_format, find_resumable, verify_checkpoint
from uniopd.train.sharded_checkpoint import DCP_DIR, load_sharded, save_sharded

SHARD = ["trainer.student_sharding=shard"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_student_dir, tiny_teacher_dir):
    """An uninterrupted 1-process run of 4 steps and a 2-process sharded run of 2 steps."""
    root = tmp_path_factory.mktemp("dcp")
    args = dp_args(root, tiny_student_dir, tiny_teacher_dir) + ["trainer.save_every=2"]
    train(args + ["trainer.steps=4"], root / "straight")
    train(args + SHARD + ["trainer.steps=2"], root / "sharded2", nproc=2)
    return root, args


def _continue(root, args: list[str], name: str, nproc: int):
    """Resume a copy of the 2-process sharded run to step 4 in `nproc` processes; it must match
    the uninterrupted run."""
    out = root / name
    shutil.copytree(root / "sharded2", out)
    train(args + ["trainer.steps=4"], out, nproc=nproc, resume=True)
    assert [r["step"] for r in metric_rows(out)] == [1, 2, 3, 4]
    assert_same_run(root / "straight", out, [3, 4])
    return out


def test_each_process_writes_its_own_shards(runs):
    root, _ = runs
    ckpt = find_resumable(root / "sharded2")
    manifest = verify_checkpoint(ckpt)
    assert manifest["format"] == "sharded" and manifest["world_size"] == 2 and checkpoint_format(ckpt) == "sharded"
    shards = sorted(p.name for p in (ckpt / DCP_DIR).glob("*.distcp"))
    assert len(shards) == 2 and {s.split("_")[2] for s in shards} == {"0", "1"}  # __<rank>_0.distcp
    assert not list(ckpt.glob("*.safetensors"))  # nothing was gathered into a full model file
    assert "optimizer" not in torch.load(ckpt / "trainer_state.pt", weights_only=False)
    assert set(manifest["files"]) >= {"dcp/.metadata", "trainer_state.pt", "config.json", *[f"dcp/{s}" for s in shards]}


def test_sharded_checkpoint_resumes_in_two_processes(runs):
    root, args = runs
    # And writes what trainer.checkpoint_format asks for, even with a sharded student.
    out = _continue(root, args + SHARD + ["trainer.checkpoint_format=full"], "2to2", nproc=2)
    assert checkpoint_format(find_resumable(out)) == "full"


def test_sharded_checkpoint_resumes_in_one_process_without_a_process_group(runs):
    root, args = runs
    out = _continue(root, args, "2to1", nproc=1)
    assert checkpoint_format(find_resumable(out)) == "full"  # one process writes the full format


def test_one_process_sharded_checkpoint_resumes_in_two(runs):
    root, args = runs
    one = root / "1to2"
    train(args + SHARD + ["trainer.steps=2"], one, nproc=1, torchrun=True)
    assert verify_checkpoint(find_resumable(one))["world_size"] == 1
    # Into a replicated student this time, which writes the sharded format when asked to.
    train(args + ["trainer.steps=4", "trainer.checkpoint_format=sharded"], one, nproc=2, resume=True)
    assert [r["step"] for r in metric_rows(one)] == [1, 2, 3, 4]
    assert verify_checkpoint(find_resumable(one))["format"] == "sharded"
    assert_same_run(root / "straight", one, [3, 4])


def test_half_written_or_damaged_sharded_checkpoints_are_never_resumed(runs, tmp_path):
    root, _ = runs
    run = tmp_path / "run"
    shutil.copytree(root / "sharded2", run)
    ckpts = run / "checkpoints"
    good = find_resumable(run)
    # A crash before the rename: every shard written, no manifest, under the temporary name.
    shutil.copytree(good, ckpts / ".tmp_step_000004", ignore=shutil.ignore_patterns("manifest.json"))
    assert find_resumable(run) == good
    for damage in ("missing shard", "truncated index", "manifest without the index"):
        bad = ckpts / "step_000004"
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(good, bad)
        if damage == "missing shard":
            next((bad / DCP_DIR).glob("__1_*.distcp")).unlink()
        elif damage == "truncated index":
            (bad / DCP_DIR / ".metadata").write_bytes(b"")
        else:
            manifest = json.loads((bad / "manifest.json").read_text())
            del manifest["files"]["dcp/.metadata"]
            (bad / "manifest.json").write_text(json.dumps(manifest))
        (ckpts / "latest").write_text("step_000004\n")
        assert find_resumable(run) == good, damage


def test_a_failed_sharded_write_keeps_the_previous_checkpoint(tiny_student_dir, tmp_path, monkeypatch):
    import uniopd.train.sharded_checkpoint as sc

    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = save_sharded(tmp_path, 1, model, None, {"step": 1}, keep=2, optimizer=optimizer, strategy=OneProcess())
    assert find_resumable(tmp_path) == first

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sc, "sha256_file", disk_full)
    with pytest.raises(RunDirError, match="step_000002.*previous checkpoint is kept"):
        save_sharded(tmp_path, 2, model, None, {"step": 2}, keep=2, optimizer=optimizer, strategy=OneProcess())
    assert not (tmp_path / "checkpoints" / ".tmp_step_000002").exists()
    assert find_resumable(tmp_path) == first
    # And it loads back into a fresh model and optimizer in this process.
    fresh = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    load_sharded(first, fresh, torch.optim.AdamW(fresh.parameters(), lr=1e-3), no_dist=True)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("overrides, message", [
    (["trainer.checkpoint_format=sharded"], "trainer.checkpoint_format=sharded needs trainer.strategy=data_parallel"),
    (["trainer.checkpoint_format=dcp"], "trainer.checkpoint_format"),
])
def test_checkpoint_format_is_never_silently_ignored(tiny_student_dir, tiny_teacher_dir, tmp_path, overrides,
                                                     message, capsys):
    args = dp_args(tmp_path, tiny_student_dir, tiny_teacher_dir)
    assert main(["train", *args, *overrides, "trainer.steps=1", "trainer.output_dir=/nonexistent/x"]) == 2
    assert message in capsys.readouterr().err

