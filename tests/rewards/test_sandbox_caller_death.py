"""The sandbox when the process that started a check dies or freezes: the check must not
outlive its wall-clock limit, and what a killed run leaves behind is cleaned at start-up."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import pytest
from sandbox_procs import kill_run, launchers_of_run, processes_of_run, start_live_run, wait_until

# A check must not outlive its wall-clock limit when the process that started it is killed
# (OOM killer, SIGKILL of the trainer) or stops enforcing the limit (frozen, stopped).

_CALLER = """
import sys
from uniopd.rewards.sandbox import SandboxLimits, run, _python_for_sandbox
rid, timeout = sys.argv[1], float(sys.argv[2])
res = run([_python_for_sandbox(), "-I", "-S", "-c", "import time\\ntime.sleep(600)\\n", "uniopd-sandbox-" + rid],
          limits=SandboxLimits(timeout_s=timeout), run_id=rid)
print("RESULT", res.timed_out, repr(res.error), flush=True)
"""


def _own_cgroup_dirs() -> list[str]:
    from uniopd.rewards.sandbox import _own_cgroup

    dirs = []
    for controller in ("pids", "memory"):
        own = _own_cgroup(controller)
        if own is not None and own[0] not in dirs:
            dirs.append(own[0])
    return dirs


def _leftovers_of_run(run_id: str) -> list[str]:
    """This run's temporary directories and cgroups that still exist."""
    left = [os.path.join(tempfile.gettempdir(), n) for n in os.listdir(tempfile.gettempdir()) if run_id in n]
    for base in _own_cgroup_dirs():
        try:
            left += [os.path.join(base, n) for n in os.listdir(base) if run_id in n]
        except OSError:
            pass
    return left


def _start_caller(run_id: str, timeout_s: float) -> subprocess.Popen:
    caller = subprocess.Popen([sys.executable, "-c", _CALLER, run_id, str(timeout_s)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if not wait_until(lambda: processes_of_run(run_id) or caller.poll() is not None, 30) or caller.poll() is not None:
        caller.kill()
        out, err = caller.communicate()
        pytest.fail(f"the sandboxed program never started: {out!r} {err[-2000:]!r}")
    return caller


def test_check_dies_within_its_limit_when_the_caller_is_killed():
    run_id = os.urandom(6).hex()
    timeout_s = 4.0
    caller = _start_caller(run_id, timeout_s)
    try:
        caller.kill()
        caller.wait()
        killed = time.monotonic()
        gone = wait_until(lambda: not (processes_of_run(run_id) or launchers_of_run(run_id)), timeout_s + 3)
        assert gone, f"sandboxed processes outlived their caller: {processes_of_run(run_id) + launchers_of_run(run_id)}"
        assert time.monotonic() - killed < timeout_s + 3
        assert wait_until(lambda: not _leftovers_of_run(run_id), 3), _leftovers_of_run(run_id)
    finally:
        kill_run(run_id)


def test_wall_limit_holds_while_the_caller_is_frozen():
    run_id = os.urandom(6).hex()
    timeout_s = 2.0
    caller = _start_caller(run_id, timeout_s)
    try:
        os.kill(caller.pid, 19)  # SIGSTOP: the caller enforces nothing now
        assert wait_until(lambda: not processes_of_run(run_id), timeout_s + 3), "the program outlived its wall limit"
        os.kill(caller.pid, 18)  # SIGCONT
        out, err = caller.communicate(timeout=60)
        assert b"RESULT True ''" in out, (out, err[-2000:])
        assert not _leftovers_of_run(run_id)
    finally:
        caller.kill()
        kill_run(run_id)


def test_leftovers_of_a_killed_run_are_cleaned_at_start_up():
    from uniopd.rewards import sandbox

    run_id = os.urandom(6).hex()
    caller = _start_caller(run_id, 60.0)
    try:
        # Freeze the caller, then SIGKILL the launcher: nobody is left to clean up.
        os.kill(caller.pid, 19)
        for pid in launchers_of_run(run_id):
            os.kill(pid, 9)
        caller.kill()
        caller.wait()
        assert wait_until(lambda: not (processes_of_run(run_id) or launchers_of_run(run_id)), 5), "the program outlived its launcher"
        assert _leftovers_of_run(run_id), "nothing left to clean: the test did not kill the launcher first"
        sandbox._clean_stale_runs()
        assert not _leftovers_of_run(run_id)
    finally:
        kill_run(run_id)


def test_start_up_cleaning_spares_live_runs():
    from uniopd.rewards.sandbox import _clean_stale_runs

    run_id, worker, box = start_live_run(2)
    try:
        assert wait_until(lambda: processes_of_run(run_id), 20)
        _clean_stale_runs()
        worker.join(30)
        assert box["res"].exit_code == 0 and not box["res"].error, box["res"]
    finally:
        worker.join(30)
        kill_run(run_id)
