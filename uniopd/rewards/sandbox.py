"""Run untrusted programs in a separate, limited process (see docs/sandbox.md).

One call of `run` starts one sandboxed process tree:

    caller (this process)
      └─ launcher   `python -I -S sandbox_launcher.py CONFIG STATUS_FD RUN_ID`, new session
           └─ monitor   pid 1 of a new PID namespace when available; reaps, reports
                └─ program   cgroups, rlimits, unprivileged uid, no new privileges, cwd = workdir

The launcher runs stdlib-only code (sandbox_launcher.py, as a script), so nothing is
inherited from the caller's interpreter: no preexec_fn (unsafe with threads), no
environment (it is started with a stripped one), no open fds but the pipes it needs.

Each protection (rlimits, random uid, no_new_privs, network/mount/PID/IPC/UTS namespaces,
a private root holding only the interpreter, its stdlib and a tmpfs workdir, per-run cgroups
for the program's tree) is applied when the OS allows it and reported in
`SandboxResult.isolation`; docs/sandbox.md says what each gives and what holds without it.
Sandbox uids come from `secrets`, never from `random`, which training seeds.

The wall clock is enforced three times: by the monitor at the deadline (it kills the
program, and with it the PID namespace), by the launcher shortly after (it kills the
monitor and the cgroups), and by the caller (process group, cgroups). The launcher dies with
its caller (PR_SET_PDEATHSIG) and then kills the run and removes its files; what a run whose
launcher was SIGKILLed too leaves behind (temp dir, cgroups) goes at the next start-up.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import glob
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from uniopd.rewards.sandbox_launcher import (
    _MB,
    _SAFE_ENV,
    _START_FAILURE,
    _UID_BASE,
    _UID_SPAN,
    _kill_cgroup,
    _own_cgroup,
    _remove_cgroup,
    _remove_tree,
    _write,
)


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
    site_packages: bool = False  # True: show the interpreter's installed packages (they may hold benchmark data)

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
_PREFIX = "uniopd-sbx-"  # names this run's temporary directory and cgroups, with its run id
_CALLER_GRACE_S = 1.0  # the monitor kills at the deadline; the caller only if nothing else did
_SYSTEM_LIB_DIRS = ("/lib", "/lib32", "/lib64", "/libx32", "/usr/lib", "/usr/lib32", "/usr/lib64", "/usr/libx32")


def _python_for_sandbox() -> str:
    # The real file: the private root holds the interpreter, not the links (venv, pyenv) to it.
    return os.path.realpath(sys.executable or shutil.which("python3") or "/usr/bin/python3")


def _draw_uid() -> int:
    return _UID_BASE + secrets.randbelow(_UID_SPAN)


def _covered(path: str, dirs) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


@functools.lru_cache(maxsize=4)
def _root_spec(site_packages: bool, exe: str) -> dict[str, list]:
    """What the private root holds: binds [(host path, path inside)], links and masked dirs.

    The interpreter and its stdlib (with the shared libraries next to them), the system
    library directories, the dynamic linker's cache and the time zone. Installed packages
    (site-/dist-packages) are masked unless asked for: they can hold benchmark data.
    """
    dirs: list[str] = []
    links: list[list[str]] = []
    for d in _SYSTEM_LIB_DIRS:
        if os.path.islink(d) and os.path.isdir(d):
            real = os.path.realpath(d)
            links.append([d, os.path.relpath(real, os.path.dirname(d))])
            dirs.append(real)
        elif os.path.isdir(d):
            dirs.append(d)
    paths = sysconfig.get_paths()
    for p in (sysconfig.get_config_var("LIBDIR"), paths.get("stdlib"), paths.get("platstdlib")):
        if p and os.path.isdir(p):
            dirs.append(os.path.realpath(p))
    top: list[str] = []
    for d in sorted(set(dirs)):  # parents sort before their children
        if not _covered(d, top):
            top.append(d)
    binds = [[d, d] for d in top]
    if not _covered(exe, top):
        binds.append([exe, exe])
    for f in ("/etc/ld.so.cache", "/etc/localtime", "/usr/share/zoneinfo"):
        if os.path.exists(f) and not _covered(f, top):
            binds.append([os.path.realpath(f), f])
    masks: list[str] = []
    if not site_packages:
        import site

        found = list(site.getsitepackages()) + [paths.get("purelib"), paths.get("platlib"), site.getusersitepackages()]
        for d in top:
            found += glob.glob(os.path.join(d, "python*", "site-packages")) + glob.glob(os.path.join(d, "python*", "dist-packages"))
        masks = sorted({os.path.realpath(p) for p in found if p and os.path.isdir(p) and _covered(os.path.realpath(p), top)})
    return {"binds": binds, "links": links, "masks": masks}


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
        path = os.path.join(base, _PREFIX + tag + ("" if v2 else f"-{controller}"))
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
                _write(os.path.join(path, "pids.max"), str(limits.nproc))
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


# ----------------------------------------------------------------------------- leftovers

_STALE_AGE_S = 600.0  # a run directory without a lock (being made, or old layout) this old is stale
_cleaned = False
_cleaning = threading.Lock()


def _run_id_of(name: str) -> str | None:
    if not name.startswith(_PREFIX):
        return None
    rid = name[len(_PREFIX):].split("-")[0]
    return rid if rid.isalnum() else None


def launcher_processes() -> list[tuple[int, list[bytes]]]:
    """(pid, argv) of every sandbox launcher (and monitor) process alive on this machine."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
            except OSError:
                continue
            if any(a.endswith(b"sandbox_launcher.py") for a in args):
                found.append((int(name), args))
    return found


def _launcher_run_ids() -> set[str]:
    """Run ids of the launchers (and their monitors) alive on this machine."""
    ids = set()
    for _, args in launcher_processes():
        for i, a in enumerate(args):
            if a.endswith(b"sandbox_launcher.py") and len(args) > i + 3:
                ids.add(args[i + 3].decode("utf-8", "replace"))
    return ids


def _is_stale(path: str) -> bool:
    """A run directory whose lock nobody holds any more (the caller and the launcher hold it
    for the whole run). Without a written lock (a run being made, an older layout): by age."""
    fd = -1
    try:
        fd = os.open(os.path.join(path, "lock"), os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_size > 0:
            return True
    except BlockingIOError:
        return False
    except OSError:
        pass
    finally:
        if fd >= 0:
            os.close(fd)
    try:
        return time.time() - os.lstat(path).st_mtime > _STALE_AGE_S
    except OSError:
        return False


def _clean_stale_runs() -> None:
    """Remove what runs of dead callers left: stale temporary directories, and the cgroups
    (with any process still in them) of runs with neither a live directory nor a launcher."""
    tmp = tempfile.gettempdir()
    live: set[str] = set()
    for name in os.listdir(tmp):
        path = os.path.join(tmp, name)
        if name.startswith(_PREFIX) and os.path.isdir(path) and not os.path.islink(path):
            if _is_stale(path):
                _remove_tree(path)
            elif _run_id_of(name):
                live.add(_run_id_of(name))
    groups = []
    for controller in ("pids", "memory"):
        own = _own_cgroup(controller)
        if own and os.path.isdir(own[0]):
            groups += [os.path.join(own[0], n) for n in os.listdir(own[0]) if _run_id_of(n) not in (None, *live)]
    if groups:
        running = _launcher_run_ids()
        for g in dict.fromkeys(groups):
            if _run_id_of(os.path.basename(g)) not in running:
                _kill_cgroup(g)
                _remove_cgroup(g)


def _clean_stale_runs_once() -> None:
    global _cleaned
    with _cleaning:
        if not _cleaned:
            _cleaned = True
            with contextlib.suppress(OSError):  # housekeeping never fails a run
                _clean_stale_runs()


# ----------------------------------------------------------------------------- one run


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


def _write_private(path: str, content: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(content)


def run(
    argv: list[str],
    *,
    files: dict[str, str | bytes] | None = None,
    stdin: bytes | str = b"",
    limits: SandboxLimits | None = None,
    fd3_data: bytes | None = None,
    run_id: str | None = None,
) -> SandboxResult:
    """Run `argv` (argv[0] an absolute path; in the private root only its real file, the
    interpreter and the system libraries exist) in the sandbox.

    files: written into the (empty) working directory before the program starts.
    fd3_data: if given, the program can read these bytes once from file descriptor 3
    (a pipe); used to hand a secret sentinel to a test harness without putting it in
    the program's files, arguments or environment.
    run_id: a public tag naming this run's cgroups and temporary directory (random by default).
    """
    limits = limits or SandboxLimits()
    if isinstance(stdin, str):
        stdin = stdin.encode()
    run_id = run_id or secrets.token_hex(6)
    if not run_id.isalnum():
        raise ValueError(f"run_id must be alphanumeric, got {run_id!r}")
    _clean_stale_runs_once()
    start = time.monotonic()
    deadline = start + limits.timeout_s
    run_dir = tempfile.mkdtemp(prefix=f"{_PREFIX}{run_id}-")  # 0700, only the caller reads it
    # Held by the caller and the launcher for the whole run: a free lock marks a dead run.
    lock_fd = os.open(os.path.join(run_dir, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    os.write(lock_fd, str(os.getpid()).encode())  # written once locked: an empty lock is no verdict
    srcdir = os.path.join(run_dir, "src")
    os.mkdir(srcdir, 0o700)
    os.mkdir(os.path.join(run_dir, "root"), 0o700)
    cgroups: list[tuple[str, str]] = []
    proc: subprocess.Popen | None = None
    status_r = status_w = -1
    clean = False  # the launcher reported the program's end: nothing of the run is left
    try:
        for name, content in (files or {}).items():
            if os.path.isabs(name) or ".." in name.split("/") or "/" in name:
                raise ValueError(f"sandbox file names must be plain names, got {name!r}")
            _write_private(os.path.join(srcdir, name), content if isinstance(content, bytes) else content.encode())
        stdin_path = os.path.join(run_dir, "stdin")
        _write_private(stdin_path, stdin)
        uid = gid = None
        if os.geteuid() == 0:
            uid = gid = _draw_uid()
        cgroups = _make_cgroups(limits, run_id)
        cpu_s = limits.cpu_s if limits.cpu_s is not None else int(limits.timeout_s + 0.999) + 1
        exe = os.path.realpath(argv[0])
        cfg = {
            "argv": list(argv),
            "exe": exe,
            "env": dict(_SAFE_ENV),
            "run_dir": run_dir,
            "srcdir": srcdir,
            "root_dir": os.path.join(run_dir, "root"),
            "root": _root_spec(limits.site_packages, exe),
            "caller_pid": os.getpid(),
            "deadline": deadline,
            "uid": uid,
            "gid": gid,
            "cgroups": [[kind, p] for kind, p in cgroups],
            "network": limits.network,
            "namespaces": limits.namespaces,
            "fd3_data": fd3_data.hex() if fd3_data is not None else None,
            "limits": {"cpu_s": int(max(1, cpu_s)), "memory": limits.memory_mb * _MB, "fsize": limits.fsize_mb * _MB,
                       "nproc": limits.nproc, "nofile": limits.nofile, "tmpfs_mb": limits.tmpfs_mb},
        }
        cfg_path = os.path.join(run_dir, "config.json")
        _write_private(cfg_path, json.dumps(cfg).encode())
        status_r, status_w = os.pipe()
        with open(stdin_path, "rb") as stdin_f:
            proc = subprocess.Popen(
                [_python_for_sandbox(), "-I", "-S", "-B", _LAUNCHER, cfg_path, str(status_w), run_id],
                stdin=stdin_f,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(status_w, lock_fd),
                start_new_session=True,
                env=dict(_SAFE_ENV),
                cwd="/",
                close_fds=True,
            )
        os.close(status_w)
        status_w = -1
        out, err, status_bytes, timed_out, exceeded = _collect(proc, status_r, deadline + _CALLER_GRACE_S, limits.output_bytes, cgroups)
        status = _parse_status(status_bytes)
        timed_out = timed_out or bool(status.get("timed_out"))
        exit_code = status.get("exit")
        sig = status.get("signal")
        error = status.get("error", "")
        if status.get("start_error"):  # from the monitor's own pipe; the program never ran
            error = f"{_START_FAILURE}: {status['start_error']}"[:300]
            exit_code = None
        if sig in (signal.SIGXCPU,) and not exceeded:
            timed_out = True
        if not status.get("done") and not timed_out and not exceeded and not error:
            error = f"sandbox launcher ended without a result (code {proc.returncode}): " + err.decode("utf-8", "replace")[-300:]
        if timed_out:
            exit_code = None
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
                with contextlib.suppress(OSError):
                    os.close(fd)
        for path in sorted({p for _, p in cgroups}):
            _remove_cgroup(path)
        _remove_tree(run_dir)
        os.close(lock_fd)  # last: the directory is gone


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
