"""Finding a sandboxed run's processes from outside (by the run id tagged on their command lines)."""

from __future__ import annotations

import os
import time


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
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
            except OSError:
                continue
            if any(a.endswith(b"sandbox_launcher.py") for a in args) and run_id.encode() in args:
                found.append(int(name))
    return found


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
