"""Data-parallel training: 2 gloo processes (torchrun, through `uniopd train --nproc 2`) against
one process on the same global batch, resume across world sizes, a sharded teacher, a killed
process.

Rollouts come from `external_backends:SeededSampler`, whose responses depend only on the
prompt, so both layouts see the same global batch; `even_length` grades them with both
outcomes in most groups, so global-scope margin shift really moves advantages.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from dp_runs import assert_same_run, dp_args, env, metric_rows, train
from helpers import write_jsonl
from teacher_servers import ServeTeacher

from uniopd.cli import main
from uniopd.train.checkpoint import find_resumable


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_student_dir, tiny_teacher_dir):
    root = tmp_path_factory.mktemp("dp")
    return root, dp_args(root, tiny_student_dir, tiny_teacher_dir)


@pytest.mark.parametrize("sharding", ["replicate", "shard"])
def test_two_processes_match_one_on_the_same_global_batch(setup, sharding):
    root, args = setup
    one, two = root / f"one_{sharding}", root / f"two_{sharding}"
    train(args + ["trainer.steps=3"], one)
    train(args + ["trainer.steps=3", f"trainer.student_sharding={sharding}"], two, nproc=2)
    assert_same_run(one, two, [1, 2, 3])
    rows = metric_rows(two)
    # Global-scope calibration had two-outcome groups to work on, and shifted some of them.
    assert sum(r["calib/num_two_outcome_groups"] for r in rows) > 0
    assert any(r.get("calib/shifted_group_frac", 0) > 0 for r in rows)


def test_a_run_resumes_at_another_world_size_and_continues_identically(setup):
    root, args = setup
    straight = root / "straight"
    train(args + ["trainer.steps=4", "trainer.save_every=2"], straight)
    for first, then, name in ((2, 1, "2to1"), (1, 2, "1to2")):
        out = root / name
        train(args + ["trainer.steps=2", "trainer.save_every=2"], out, nproc=first)
        train(args + ["trainer.steps=4", "trainer.save_every=2"], out, nproc=then, resume=True)
        assert [r["step"] for r in metric_rows(out)] == [1, 2, 3, 4]
        assert_same_run(straight, out, [3, 4])


def test_a_sharded_teacher_scores_as_a_whole_one(setup):
    root, args = setup
    # 3 prompts of 2 rollouts in micro-batches of 2: one process scores 2 micro-batches, the
    # other 1 and pads; the routed teacher's layers are sharded over both.
    common = args + ["trainer.steps=2", "rollout.prompts_per_step=3", "trainer.micro_batch_size=2",
                     "teachers.t.share_prompt_prefix=false"]
    one, two = root / "teacher_whole", root / "teacher_sharded"
    train(common, one)
    done = train(common + ["teachers.t.shard=true", "trainer.student_sharding=shard"], two, nproc=2)
    assert "teachers.t: 2 decoder layers sharded over 2 processes" in done.stderr
    assert_same_run(one, two, [1, 2])


def test_sharded_teachers_pad_on_processes_that_have_no_rows_for_them(setup, tiny_teacher_dir):
    root, args = setup
    # Unshuffled, 4 prompts a step: process 0 gets records 4k, 4k+1 (teacher a), process 1 gets
    # 4k+2, 4k+3 (teacher b), so each process scores nothing for one of the sharded teachers.
    data = write_jsonl(root / "two_teachers.jsonl", [
        {"id": f"p{i}", "domain": "arithmetic", "prompt": f"{i}+{i + 1}=", "answer": str(2 * i + 1),
         "verifier": "even_length", "teacher": "a" if i % 4 < 2 else "b"} for i in range(12)])
    common = [a for a in args if not a.startswith(("teachers.t.", "data.train="))] + [
        f"data.train={data}", "data.shuffle=false", "trainer.steps=2", "calibration.scope=group"]
    for name in ("a", "b"):
        common += [f"teachers.{name}.path={tiny_teacher_dir}", f"teachers.{name}.share_prompt_prefix=false"]
    one, two = root / "teachers_whole", root / "teachers_sharded"
    train(common, one)
    train(common + ["teachers.a.shard=true", "teachers.b.shard=true"], two, nproc=2)
    assert_same_run(one, two, [1, 2])


def test_each_process_scores_its_rows_with_the_teacher_server_as_one_process_in_process(setup, tiny_teacher_dir):
    root, args = setup
    server = ServeTeacher(tiny_teacher_dir).start()
    try:
        one, two = root / "teacher_in_process", root / "teacher_served"
        train(args + ["trainer.steps=2"], one)
        train(args + ["trainer.steps=2", "teachers.t.backend=remote", f"teachers.t.urls=[{server.url}]",
                      "teachers.t.timeout_s=60"], two, nproc=2)
    finally:
        server.kill()
    assert_same_run(one, two, [1, 2])


def test_teacher_service_metrics_cover_every_process():
    from uniopd.train.distributed import merge_teacher_metrics

    # Process 0 scored 100 tokens of teacher a in 2 s; process 1 300 tokens in 4 s, and had rows
    # for teacher b too.
    parts = [{"teacher/a/failed_rows": 1.0, "teacher/a/latency_s": 2.0, "teacher/a/tokens_per_s": 50.0,
              "teacher/a/request_latency_s": 0.5, "teacher/a/retries": 2.0},
             {"teacher/a/failed_rows": 3.0, "teacher/a/latency_s": 4.0, "teacher/a/tokens_per_s": 75.0,
              "teacher/a/request_latency_s": 1.5, "teacher/a/retries": 0.0,
              "teacher/b/failed_rows": 0.0, "teacher/b/latency_s": 1.0, "teacher/b/tokens_per_s": 10.0}]
    assert merge_teacher_metrics(parts) == {
        "teacher/a/failed_rows": 4.0, "teacher/a/latency_s": 4.0, "teacher/a/tokens_per_s": 400 / 4.0,
        "teacher/a/request_latency_s": 1.0, "teacher/a/retries": 2.0,
        "teacher/b/failed_rows": 0.0, "teacher/b/latency_s": 1.0, "teacher/b/tokens_per_s": 10.0}


@pytest.mark.parametrize("overrides, message", [
    (["teachers.t.shard=true", "teachers.t.share_prompt_prefix=false"],
     "teachers.t.shard=true needs trainer.strategy=data_parallel"),
    (["teachers.t.shard=true", "trainer.strategy=data_parallel"],
     "teachers.t.shard=true needs teachers.t.share_prompt_prefix=false"),
    (["teachers.t.shard=true", "teachers.t.backend=remote", "teachers.t.urls=[http://localhost:1]"],
     "teachers.t.shard=True is read by teachers.t.backend=local only"),
])
def test_teacher_sharding_is_refused_where_it_cannot_work(setup, overrides, message, capsys):
    _, args = setup
    assert main(["train", *args, *overrides, "trainer.steps=1", "trainer.output_dir=/nonexistent/x"]) == 2
    assert message in capsys.readouterr().err


def test_a_killed_process_ends_the_job_promptly_and_the_run_resumes(setup):
    import psutil

    root, args = setup
    out = root / "killed"
    cmd = [sys.executable, "-m", "uniopd", "train", "--nproc=2", *args, "trainer.steps=200", "trainer.save_every=1",
           f"trainer.output_dir={out}"]
    job = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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
    assert metric_rows(out)[-1]["step"] == step + 1


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
    job = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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
    assert last is not None and int(last.name.split("_")[1]) == metric_rows(out)[-1]["step"]


@pytest.mark.gpu
@pytest.mark.parametrize("sharding", ["replicate", "shard"])
def test_on_a_gpu_a_data_parallel_run_steps_saves_and_resumes(setup, sharding):
    """NCCL for the student's CUDA tensors, gloo for the CPU metric and stop-signal reductions:
    one torchrun process on one GPU runs every collective a data-parallel step makes."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    root, args = setup
    out = root / f"gpu_{sharding}"
    gpu = args + ["trainer.device=cuda", f"trainer.student_sharding={sharding}", "trainer.save_every=2"]
    train(gpu + ["trainer.steps=2"], out, torchrun=True)
    train(gpu + ["trainer.steps=3"], out, torchrun=True, resume=True)
    assert [r["step"] for r in metric_rows(out)] == [1, 2, 3]
