"""Finding a sandboxed run's processes from outside (by the run id tagged on their command lines)."""

from __future__ import annotations

import os
import threading
import time

from uniopd.rewards.sandbox import launcher_processes


def processes_of_run(run_id: str) -> list[int]:
    """Live processes whose command line carries this run's tag."""
    found = []
    tag = f"uniopd-sandbox-{run_id}".encode()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if tag in f.read():
                    found.append(int(name))
        except OSError:
            pass
    return found


def launchers_of_run(run_id: str) -> list[int]:
    return [pid for pid, args in launcher_processes() if run_id.encode() in args]


def wait_until(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def kill_run(run_id: str) -> None:
    """Test cleanup: whatever of this run is still alive (only processes tagged with its id)."""
    for pid in processes_of_run(run_id) + launchers_of_run(run_id):
        try:
            os.kill(pid, 9)
        except OSError:
            pass


def start_live_run(sleep_s: float) -> tuple[str, threading.Thread, dict]:
    """A sandboxed program that sleeps `sleep_s` seconds, run from a thread: (its run id, the
    thread, a dict that gets its result under "res" when it ends)."""
    from uniopd.rewards.sandbox import SandboxLimits, _python_for_sandbox, run

    run_id = os.urandom(6).hex()
    box: dict = {}
    argv = [_python_for_sandbox(), "-I", "-S", "-c", f"import time\ntime.sleep({sleep_s})\n",
            f"uniopd-sandbox-{run_id}"]
    worker = threading.Thread(target=lambda: box.setdefault("res", run(argv, limits=SandboxLimits(timeout_s=20),
                                                                        run_id=run_id)))
    worker.start()
    return run_id, worker, box
