"""Run untrusted programs in a separate, limited process (see docs/sandbox.md).

One call of `run` starts one sandboxed process tree:

    caller (this process)
      └─ launcher   `python -I -S sandbox.py CONFIG STATUS_FD`, new session (process group)
           └─ monitor   pid 1 of a new PID namespace when available; reaps, reports
                └─ program   rlimits, unprivileged uid, no new privileges, cwd = workdir

The launcher runs stdlib-only code (this very file, as a script), so nothing is
inherited from the caller's interpreter: no preexec_fn (unsafe with threads), no
environment (it is started with a stripped one), no open fds but the pipes it needs.

Protections, each applied when the OS allows it and reported in `SandboxResult.isolation`:
  rlimits         RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NPROC, RLIMIT_NOFILE, RLIMIT_CORE
  uid             as root: a random unprivileged uid/gid per run, no groups (this is
                  what makes RLIMIT_NPROC count: the kernel does not enforce it for root)
  no_new_privs    PR_SET_NO_NEW_PRIVS: setuid binaries cannot raise privileges
  netns           new network namespace: only a downed loopback, no route anywhere
  mountns         new mount namespace: every mount remounted read-only, /root and
                  /home masked by empty tmpfs (the interpreter is bound back read-only),
                  the workdir a fresh size-limited tmpfs
  pidns           new PID namespace: the program sees only its own tree in /proc, and
                  when the monitor (pid 1) exits the kernel kills every process left
  ipcns, utsns    new SysV IPC and hostname namespaces
  userns          not root: a user namespace is used to get netns/mountns/pidns
  cgroup_pids     cgroup pids.max for the whole tree (v1 or v2, when writable)
  cgroup_memory   cgroup memory limit for the whole tree (when writable)
A wall-clock timeout kills the whole process group (os.killpg), the cgroup and, through
pid 1, the PID namespace.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uniopd.rewards.sandbox_launcher import _MB, _SAFE_ENV, _START_FAILURE, _UID_BASE, _UID_SPAN, _write

@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one sandboxed run."""

    timeout_s: float = 10.0  # wall clock, from launch to kill
    cpu_s: float | None = None  # RLIMIT_CPU; default ceil(timeout_s) + 1
    memory_mb: int = 1024  # RLIMIT_AS, per process
    group_memory_mb: int = 2048  # cgroup memory limit for the whole tree, when available
    fsize_mb: int = 16  # RLIMIT_FSIZE: largest file the program may write
    nproc: int = 32  # RLIMIT_NPROC (and cgroup pids.max): processes + threads
    nofile: int = 256  # RLIMIT_NOFILE
    output_bytes: int = 1 * _MB  # cap on captured stdout and on stderr, each
    tmpfs_mb: int = 64  # size of the workdir tmpfs (mount namespace only)
    network: bool = False  # True: keep the host network (no network namespace)
    namespaces: bool = True  # False: no namespaces at all (rlimits, uid, cgroups only)

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"SandboxLimits.timeout_s must be > 0, got {self.timeout_s}")
        for name in ("memory_mb", "group_memory_mb", "fsize_mb", "nproc", "nofile", "output_bytes", "tmpfs_mb"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SandboxLimits.{name} must be > 0, got {getattr(self, name)}")


@dataclass
class SandboxResult:
    """What happened to one sandboxed run."""

    exit_code: int | None  # the program's exit status, None if it did not exit normally
    term_signal: int | None  # the signal that killed the program, if any
    stdout: bytes
    stderr: bytes
    timed_out: bool  # wall-clock or CPU-time limit
    output_exceeded: bool  # stdout or stderr went past the cap; the run was killed
    duration_s: float
    isolation: dict[str, bool] = field(default_factory=dict)
    error: str = ""  # the sandbox itself failed (could not start, ...)
    run_id: str = ""  # names this run's cgroups; run_python also puts it on the command line
    uid: int | None = None  # the uid the program ran as (None: the caller's own uid)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.output_exceeded and not self.error

    def stderr_tail(self, max_chars: int = 600) -> str:
        text = self.stderr.decode("utf-8", "replace").rstrip()
        return text[-max_chars:]


# ----------------------------------------------------------------------------- caller side

_LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_launcher.py")


def _python_for_sandbox() -> str:
    return sys.executable or shutil.which("python3") or "/usr/bin/python3"


def _expose_paths() -> list[str]:
    """Real paths the interpreter needs, to bind back when /root and /home are masked."""
    paths = set()
    for p in (sys.executable, sys.base_prefix, sys.prefix, sys.exec_prefix, sys.base_exec_prefix):
        if p:
            paths.add(os.path.realpath(p if os.path.isdir(p) else os.path.dirname(p)))
    for p in sys.path:
        if p and os.path.isdir(p):
            paths.add(os.path.realpath(p))
    out: list[str] = []
    for p in sorted(paths):  # parents sort before their children
        if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in out):
            out.append(p)
    return out


def _dirs_to_hide(expose: list[str]) -> list[str]:
    """/root and /home, plus every directory above an exposed path that others cannot enter.

    The sandbox runs as an unprivileged uid, so an interpreter inside, say, a 0700 temporary
    directory (a venv made under `mktemp -d`) would be unreachable. Masking such a directory
    with a 0755 tmpfs and binding the exposed path back makes exactly that path reachable.
    """
    hide = ["/root", "/home"]
    for path in expose:
        for anc in reversed(Path(path).parents):
            anc_s = str(anc)
            if anc_s == "/" or any(anc_s == h or anc_s.startswith(h + "/") for h in hide):
                continue
            try:
                mode = os.stat(anc_s).st_mode
            except OSError:
                continue
            if not mode & stat.S_IXOTH:
                hide.append(anc_s)
                break
    return hide


def _own_cgroup(controller: str) -> tuple[str, bool] | None:
    """(path of this process's cgroup for `controller`, is_v2) or None."""
    try:
        lines = open("/proc/self/cgroup").read().splitlines()
    except OSError:
        return None
    v2_rel = None
    for line in lines:
        hid, ctrls, rel = line.split(":", 2)
        if controller in ctrls.split(","):
            for base in (f"/sys/fs/cgroup/{controller}", f"/sys/fs/cgroup/{ctrls}"):
                if os.path.isdir(base):
                    return os.path.join(base, rel.lstrip("/")), False
        if hid == "0" and ctrls == "":
            v2_rel = rel
    if v2_rel is not None:
        for base in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
            if os.path.exists(os.path.join(base, "cgroup.controllers")):
                return os.path.join(base, v2_rel.lstrip("/")), True
    return None


def _make_cgroups(limits: SandboxLimits, tag: str) -> list[tuple[str, str]]:
    """Create per-run cgroups where writable. Returns [(kind, dir)], kind pids|memory."""
    made: list[tuple[str, str]] = []
    if os.geteuid() != 0:
        return made
    mem = str(limits.group_memory_mb * _MB)
    for controller in ("pids", "memory"):
        own = _own_cgroup(controller)
        if own is None:
            continue
        base, v2 = own
        path = os.path.join(base, f"uniopd-sbx-{tag}" + ("" if v2 else f"-{controller}"))
        if any(p == path for _, p in made):  # cgroup v2: one directory for both
            path_made = True
        else:
            try:
                os.mkdir(path)
                path_made = False
            except OSError:
                continue
        try:
            if controller == "pids":
                _write(os.path.join(path, "pids.max"), str(limits.nproc + 4))
            elif v2:
                _write(os.path.join(path, "memory.max"), mem)
                if os.path.exists(os.path.join(path, "memory.swap.max")):
                    _write(os.path.join(path, "memory.swap.max"), "0")
            else:
                _write(os.path.join(path, "memory.limit_in_bytes"), mem)
                if os.path.exists(os.path.join(path, "memory.memsw.limit_in_bytes")):
                    try:
                        _write(os.path.join(path, "memory.memsw.limit_in_bytes"), mem)
                    except OSError:
                        pass
            made.append((controller, path))
        except OSError:
            if not path_made:
                _remove_cgroup(path)
    return made


def _cgroup_pids(path: str) -> list[int]:
    try:
        return [int(x) for x in open(os.path.join(path, "cgroup.procs")).read().split()]
    except (OSError, ValueError):
        return []


def _kill_cgroup(path: str, rounds: int = 200) -> None:
    kill_file = os.path.join(path, "cgroup.kill")  # cgroup v2 >= 5.14
    if os.path.exists(kill_file):
        try:
            _write(kill_file, "1")
        except OSError:
            pass
    for _ in range(rounds):
        pids = _cgroup_pids(path)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.005)


def _remove_cgroup(path: str) -> None:
    for _ in range(100):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            _kill_cgroup(path, rounds=5)
            time.sleep(0.01)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


def run(
    argv: list[str],
    *,
    files: dict[str, str | bytes] | None = None,
    stdin: bytes | str = b"",
    limits: SandboxLimits | None = None,
    fd3_data: bytes | None = None,
    run_id: str | None = None,
) -> SandboxResult:
    """Run `argv` (argv[0] an absolute path) in the sandbox.

    files: written into the (empty) working directory before the program starts.
    fd3_data: if given, the program can read these bytes once from file descriptor 3
    (a pipe); used to hand a secret sentinel to a test harness without putting it in
    the program's files, arguments or environment.
    run_id: a public tag naming this run's cgroups (random by default).
    """
    limits = limits or SandboxLimits()
    if isinstance(stdin, str):
        stdin = stdin.encode()
    run_id = run_id or secrets.token_hex(6)
    if not run_id.isalnum():
        raise ValueError(f"run_id must be alphanumeric, got {run_id!r}")
    start = time.monotonic()
    private = tempfile.mkdtemp(prefix="uniopd-sbx-priv-")  # 0700, only the caller reads it
    workdir = tempfile.mkdtemp(prefix="uniopd-sbx-work-")
    srcdir = os.path.join(private, "src")
    os.mkdir(srcdir)
    cgroups: list[tuple[str, str]] = []
    proc: subprocess.Popen | None = None
    status_r = status_w = -1
    clean = False  # the launcher reported the program's end: nothing of the run is left
    try:
        for name, content in (files or {}).items():
            if os.path.isabs(name) or ".." in name.split("/") or "/" in name:
                raise ValueError(f"sandbox file names must be plain names, got {name!r}")
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(os.path.join(srcdir, name), mode) as f:
                f.write(content)
        stdin_path = os.path.join(private, "stdin")
        with open(stdin_path, "wb") as f:
            f.write(stdin)
        is_root = os.geteuid() == 0
        uid = gid = None
        if is_root:
            uid = gid = _UID_BASE + random.randrange(_UID_SPAN)
        cgroups = _make_cgroups(limits, run_id)
        cpu_s = limits.cpu_s if limits.cpu_s is not None else int(limits.timeout_s + 0.999) + 1
        expose = _expose_paths()
        cfg = {
            "argv": list(argv),
            "env": dict(_SAFE_ENV, HOME=workdir, TMPDIR=workdir),
            "workdir": workdir,
            "srcdir": srcdir,
            "uid": uid,
            "gid": gid,
            "cgroups": [[kind, p] for kind, p in cgroups],
            "network": limits.network,
            "namespaces": limits.namespaces,
            "fd3_data": fd3_data.hex() if fd3_data is not None else None,
            "expose": expose,
            "hide": _dirs_to_hide(expose),
            "limits": {
                "cpu_s": int(max(1, cpu_s)),
                "memory": limits.memory_mb * _MB,
                "fsize": limits.fsize_mb * _MB,
                "nproc": limits.nproc,
                "nofile": limits.nofile,
                "tmpfs_mb": limits.tmpfs_mb,
            },
        }
        cfg_path = os.path.join(private, "config.json")
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
        status_r, status_w = os.pipe()
        with open(stdin_path, "rb") as stdin_f:
            proc = subprocess.Popen(
                [_python_for_sandbox(), "-I", "-S", "-B", _LAUNCHER, cfg_path, str(status_w), run_id],
                stdin=stdin_f,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(status_w,),
                start_new_session=True,
                env=dict(_SAFE_ENV),
                cwd="/",
                close_fds=True,
            )
        os.close(status_w)
        status_w = -1
        out, err, status_bytes, timed_out, exceeded = _collect(proc, status_r, start + limits.timeout_s, limits.output_bytes, cgroups)
        status = _parse_status(status_bytes)
        exit_code = status.get("exit")
        sig = status.get("signal")
        error = status.get("error", "")
        if sig in (signal.SIGXCPU,) and not exceeded:
            timed_out = True
        if not status.get("done") and not timed_out and not exceeded and not error:
            error = f"sandbox launcher ended without a result (code {proc.returncode}): " + err.decode("utf-8", "replace")[-300:]
        if timed_out:
            exit_code = None
        if exit_code == 127 and err.startswith(_START_FAILURE):
            error = err.decode("utf-8", "replace").strip()[:300]
        clean = bool(status.get("done")) and not (timed_out or exceeded)
        return SandboxResult(
            uid=uid if status.get("isolation", {}).get("uid") else None,
            exit_code=exit_code,
            term_signal=sig,
            stdout=out,
            stderr=err,
            timed_out=timed_out,
            output_exceeded=exceeded,
            duration_s=time.monotonic() - start,
            isolation=status.get("isolation", {}),
            error=error,
            run_id=run_id,
        )
    except Exception as exc:  # the sandbox itself failed
        return SandboxResult(None, None, b"", b"", False, False, time.monotonic() - start, {}, f"sandbox error: {exc!r}", run_id)
    finally:
        if proc is not None:
            if not clean:  # (after a clean end the group is gone and its id may be reused)
                _killpg(proc.pid)
            for _, path in cgroups:
                _kill_cgroup(path)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        for fd in (status_r, status_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        for path in sorted({p for _, p in cgroups}):
            _remove_cgroup(path)
        shutil.rmtree(private, ignore_errors=True)
        _rmtree_workdir(workdir)


def _rmtree_workdir(workdir: str) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
    if os.path.exists(workdir):  # e.g. files the program made read-only (plain mode)
        for root, dirs, _ in os.walk(workdir):
            for d in dirs:
                try:
                    os.chmod(os.path.join(root, d), 0o700)
                except OSError:
                    pass
        shutil.rmtree(workdir, ignore_errors=True)


def _collect(proc, status_fd, deadline, cap, cgroups):
    """Read stdout/stderr/status until the launcher is done, the deadline or the cap."""
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray(), status_fd: bytearray()}
    open_fds = set(bufs)
    sel = selectors.DefaultSelector()
    for fd in bufs:
        sel.register(fd, selectors.EVENT_READ)
    timed_out = exceeded = False
    exited_at = None
    try:
        while open_fds:
            now = time.monotonic()
            if now >= deadline:
                timed_out = proc.poll() is None or exited_at is None
                break
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > 0.5:
                break  # launcher gone; stragglers holding the pipes are killed below
            for key, _ in sel.select(timeout=min(0.1, deadline - now)):
                fd = key.fd
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    sel.unregister(fd)
                    open_fds.discard(fd)
                    continue
                buf = bufs[fd]
                if fd != status_fd and len(buf) + len(chunk) > cap:
                    buf += chunk[: max(0, cap - len(buf))]
                    exceeded = True
                else:
                    buf += chunk
            if exceeded:
                break
        if timed_out or exceeded:
            _killpg(proc.pid)
            for _, path in cgroups:
                _kill_cgroup(path)
        # The status pipe carries the final report; read what is left without blocking long.
        end = time.monotonic() + (0.5 if not (timed_out or exceeded) else 0.2)
        while status_fd in open_fds and time.monotonic() < end:
            if not sel.select(timeout=0.05):
                continue
            try:
                chunk = os.read(status_fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            bufs[status_fd] += chunk
    finally:
        sel.close()
    return (bytes(bufs[proc.stdout.fileno()]), bytes(bufs[proc.stderr.fileno()]), bytes(bufs[status_fd]), timed_out, exceeded)


def _parse_status(data: bytes) -> dict[str, Any]:
    status: dict[str, Any] = {}
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            status.update(json.loads(line))
        except ValueError:
            pass
    return status


_PROBE: dict[str, bool] | None = None


def isolation_available() -> dict[str, bool]:
    """Which protections work on this machine (probed once with a trivial program)."""
    global _PROBE
    if _PROBE is None:
        res = run([_python_for_sandbox(), "-I", "-S", "-c", "pass"], limits=SandboxLimits(timeout_s=20))
        _PROBE = dict(res.isolation)
        if res.error:
            _PROBE["error"] = False
    return dict(_PROBE)


# The harness a Python program runs under: it reads an optional secret from fd 3 first,
# runs prog.py, and only if that returns normally writes the secret as the last line of
# stdout. A program that exits early (sys.exit, os._exit, a signal) never prints it.
PYTHON_HARNESS = """\
import os, sys
def _uniopd_harness():
    try:
        done = os.read(3, 4096)
        os.close(3)
    except OSError:
        done = b""
    path = os.path.abspath("prog.py")
    sys.argv = [path]
    code = compile(open(path, encoding="utf-8").read(), path, "exec")
    exec(code, {"__name__": __MODULE_NAME__, "__file__": path, "__builtins__": __builtins__})
    sys.stdout.flush()
    if done:
        os.write(1, b"\\n" + done + b"\\n")
_uniopd_harness()
"""


def run_python(
    source: str,
    *,
    stdin: bytes | str = b"",
    limits: SandboxLimits | None = None,
    sentinel: bytes | None = None,
    module_name: str = "__main__",
    files: dict[str, str | bytes] | None = None,
) -> SandboxResult:
    """Run Python `source` (as prog.py, `__name__ == module_name`) in the sandbox.

    sentinel: if given, it is printed as the last line of stdout only when the whole
    program ran to the end (it travels through a pipe on fd 3, not through the program's
    files, arguments or environment).
    """
    if not module_name.isidentifier():
        raise ValueError(f"module_name must be an identifier, got {module_name!r}")
    harness = PYTHON_HARNESS.replace("__MODULE_NAME__", repr(module_name))
    run_id = secrets.token_hex(6)
    # The run id is an extra argument, so this run's processes can be found by command line.
    argv = [_python_for_sandbox(), "-I", "-B", "-c", harness, f"uniopd-sandbox-{run_id}"]
    all_files = dict(files or {})
    all_files["prog.py"] = source
    return run(argv, files=all_files, stdin=stdin, limits=limits, fd3_data=sentinel, run_id=run_id)
