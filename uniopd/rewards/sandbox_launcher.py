"""The sandbox launcher: the stdlib-only script `uniopd.rewards.sandbox.run` starts as
`python -I -S sandbox_launcher.py CONFIG STATUS_FD RUN_ID`. It sets up namespaces, mounts,
cgroups, rlimits and the unprivileged uid, then execs the program (see sandbox.py).
"""

from __future__ import annotations

# The launcher runs this file as a script (`python -I -S sandbox_launcher.py ...`); it needs only
# the light stdlib imports below (the caller side lives in sandbox.py).
import ctypes
import json
import os
import signal
import sys
import time
from typing import Any

# ----------------------------------------------------------------------------- constants

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38

_MOUNT_OPT_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
}

# Sandboxed programs run as a random uid/gid in [_UID_BASE, _UID_BASE + _UID_SPAN): no
# file on the host belongs to them, and RLIMIT_NPROC counts only this run's processes.
_UID_BASE = 200_000_000
_UID_SPAN = 50_000_000

_SAFE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}

_MB = 1 << 20
_START_FAILURE = b"sandbox: could not start the program"


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


# ----------------------------------------------------------------------------- launcher side
# Runs in the launcher process (`python -I -S sandbox.py ...`): light stdlib imports only.


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _mount(libc, src, target, fstype, flags, data=None) -> None:
    enc = lambda s: s.encode() if isinstance(s, str) else s  # noqa: E731
    _check(libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def _unescape(path: str) -> str:
    out, i = [], 0
    while i < len(path):
        if path[i] == "\\" and len(path[i + 1 : i + 4]) == 3 and path[i + 1 : i + 4].isdigit():
            out.append(chr(int(path[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(path[i])
            i += 1
    return "".join(out)


def _mount_table() -> list[tuple[str, int]]:
    """[(mount point, per-mount flags)] from /proc/self/mountinfo, in mount order."""
    table = []
    for line in open("/proc/self/mountinfo").read().splitlines():
        parts = line.split()
        point, opts = _unescape(parts[4]), parts[5].split(",")
        flags = 0
        for opt in opts:
            flags |= _MOUNT_OPT_FLAGS.get(opt, 0)
        table.append((point, flags))
    return table


def _setup_mounts(libc, cfg, iso, userns: bool) -> None:
    """Private propagation, masks over /root and /home, read-only everything, tmpfs workdir."""
    workdir = cfg["workdir"]
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    # Keep handles on what the interpreter needs before masking the directories holding it.
    hidden = [h for h in cfg["hide"] if os.path.isdir(h) and not os.path.islink(h)]
    keep = []
    for path in cfg["expose"]:
        if any(path == h or path.startswith(h + "/") for h in hidden) and os.path.isdir(path):
            keep.append((path, os.open(path, os.O_PATH | os.O_DIRECTORY)))
    masked = []
    for h in hidden:
        try:
            _mount(libc, "tmpfs", h, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
            masked.append(h)
        except OSError:
            pass
    for path, fd in keep:
        try:
            os.makedirs(path, exist_ok=True)
            _mount(libc, f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        except OSError:
            pass
        os.close(fd)
    iso["masked_home"] = bool(masked) and len(masked) == len(hidden)
    # Workdir: a fresh tmpfs, owned by the sandbox uid, bounded in size.
    owner = "" if cfg["uid"] is None or userns else f",uid={cfg['uid']},gid={cfg['gid']}"
    _mount(libc, "tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['limits']['tmpfs_mb']}m,mode=0700{owner}")
    _copy_files(cfg, workdir)
    # Everything else read-only. Later (upper) mounts are remounted after the lower ones.
    failed = []
    for point, flags in _mount_table():
        if point == workdir:
            continue
        try:
            _mount(libc, None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
        except OSError:
            failed.append(point)
    root_ro = "/" not in failed and all(not (p == "/tmp" or p == "/dev/shm") for p in failed)
    iso["readonly_fs"] = root_ro
    iso["tmpfs_workdir"] = True


def _copy_files(cfg, dest) -> None:
    src = cfg["srcdir"]
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as fi, open(os.path.join(dest, name), "wb") as fo:
            fo.write(fi.read())
        os.chmod(os.path.join(dest, name), 0o644)


def _set_rlimits(lim) -> None:
    import resource  # noqa: PLC0415

    def cap(kind, value):
        try:
            _, hard = resource.getrlimit(kind)
            value = int(value)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            resource.setrlimit(kind, (value, value))
        except (ValueError, OSError):
            pass

    cpu = int(lim["cpu_s"])
    try:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    except (ValueError, OSError):
        cap(resource.RLIMIT_CPU, cpu)
    cap(resource.RLIMIT_AS, lim["memory"])
    cap(resource.RLIMIT_FSIZE, lim["fsize"])
    cap(resource.RLIMIT_NPROC, lim["nproc"])
    cap(resource.RLIMIT_NOFILE, lim["nofile"])
    cap(resource.RLIMIT_CORE, 0)


def _report(fd: int, obj: dict) -> None:
    try:
        os.write(fd, (json.dumps(obj) + "\n").encode())
    except OSError:
        pass


def _launcher_main(cfg_path: str, status_fd: int) -> None:
    cfg = json.load(open(cfg_path))
    libc = _libc()
    iso: dict[str, bool] = {}
    is_root = os.geteuid() == 0
    # cgroups first, so that every later process is counted.
    for kind, path in cfg["cgroups"]:
        try:
            _write(os.path.join(path, "cgroup.procs"), str(os.getpid()))
            iso["cgroup_" + kind] = True
        except OSError:
            pass
    iso.setdefault("cgroup_pids", False)
    iso.setdefault("cgroup_memory", False)
    # Namespaces.
    want = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | (0 if cfg["network"] else CLONE_NEWNET)
    got = 0
    userns = False
    if not cfg.get("namespaces", True):
        pass
    elif is_root:
        if libc.unshare(want) == 0:
            got = want
        else:
            for flag in (CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWIPC, CLONE_NEWUTS):
                if want & flag and libc.unshare(flag) == 0:
                    got |= flag
    else:
        uid, gid = os.getuid(), os.getgid()
        if libc.unshare(want | CLONE_NEWUSER) == 0:
            got, userns = want, True
            try:
                _write("/proc/self/setgroups", "deny")
            except OSError:
                pass
            _write("/proc/self/uid_map", f"{uid} {uid} 1")
            _write("/proc/self/gid_map", f"{gid} {gid} 1")
    iso["userns"] = userns
    iso["netns"] = bool(got & CLONE_NEWNET)
    iso["pidns"] = bool(got & CLONE_NEWPID)
    iso["ipcns"] = bool(got & CLONE_NEWIPC)
    iso["utsns"] = bool(got & CLONE_NEWUTS)
    iso["mountns"] = False
    iso["readonly_fs"] = False
    iso["masked_home"] = False
    iso["tmpfs_workdir"] = False
    if got & CLONE_NEWNS:
        try:
            _setup_mounts(libc, cfg, iso, userns)
            iso["mountns"] = True
        except OSError as exc:  # fall back to the plain workdir below
            _report(status_fd, {"mount_error": str(exc)})
    workdir = cfg["workdir"]
    if not iso["tmpfs_workdir"]:
        _copy_files(cfg, workdir)
        if cfg["uid"] is not None:
            os.chown(workdir, cfg["uid"], cfg["gid"])
            os.chmod(workdir, 0o700)
    drop_uid = is_root and cfg["uid"] is not None
    iso["uid"] = drop_uid
    iso["no_new_privs"] = True
    iso["rlimits"] = True
    iso["nproc_enforced"] = drop_uid or not is_root or userns
    data_r = data_w = -1
    if cfg["fd3_data"] is not None:
        data_r, data_w = os.pipe()
        os.write(data_w, bytes.fromhex(cfg["fd3_data"]))
        os.close(data_w)
    _report(status_fd, {"isolation": iso})

    monitor = os.fork()
    if monitor == 0:
        try:
            _monitor_main(libc, cfg, iso, status_fd, data_r, drop_uid)
        finally:
            os._exit(70)
    if data_r >= 0:
        os.close(data_r)
    while True:
        try:
            _, st = os.waitpid(monitor, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(st):
        _report(status_fd, {"monitor_signal": os.WTERMSIG(st)})
    os._exit(0)


def _monitor_main(libc, cfg, iso, status_fd, data_r, drop_uid) -> None:
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1 and not iso["pidns"]:
        os._exit(71)  # launcher already gone
    if iso["pidns"] and iso["mountns"]:
        try:
            _mount(libc, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except OSError:
            pass
    if not iso["pidns"]:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    child = os.fork()
    if child == 0:
        try:
            _exec_program(libc, cfg, status_fd, data_r, drop_uid)
        except BaseException as exc:  # noqa: BLE001
            try:
                os.write(2, _START_FAILURE + f": {exc}\n".encode())
            finally:
                os._exit(127)
    if data_r >= 0:
        os.close(data_r)
    status: dict[str, Any] = {}
    while True:
        try:
            pid, st = os.waitpid(-1, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            break
        if pid == child:
            if os.WIFEXITED(st):
                status = {"exit": os.WEXITSTATUS(st), "signal": None}
            elif os.WIFSIGNALED(st):
                status = {"exit": None, "signal": os.WTERMSIG(st)}
            break
    if not iso["pidns"]:
        _kill_descendants()
    status["done"] = True
    _report(status_fd, status)
    os._exit(0)


def _kill_descendants() -> None:
    """Subreaper fallback (no PID namespace): kill every orphan reparented to us."""
    me = os.getpid()
    for _ in range(400):
        kids = []
        try:
            for name in os.listdir("/proc"):
                if name.isdigit():
                    try:
                        stat = open(f"/proc/{name}/stat").read()
                        if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                            kids.append(int(name))
                    except (OSError, ValueError, IndexError):
                        pass
        except OSError:
            pass
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            return
        time.sleep(0.005)


def _exec_program(libc, cfg, status_fd, data_r, drop_uid) -> None:
    # The program stays in the launcher's process group, so the caller's killpg reaches it.
    if data_r >= 0:
        if data_r != 3:
            os.dup2(data_r, 3, inheritable=True)
            os.close(data_r)
        else:
            os.set_inheritable(3, True)
        os.closerange(4, 65536)
    else:
        os.closerange(3, 65536)
    # The status fd is closed above; a failure after this point shows as exit code 127.
    _set_rlimits(cfg["limits"])
    if drop_uid:
        os.setgroups([])
        os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
        os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.chdir(cfg["workdir"])
    argv = cfg["argv"]
    os.execve(argv[0], argv, cfg["env"])


if __name__ == "__main__":
    _launcher_main(sys.argv[1], int(sys.argv[2]))
    raise SystemExit(0)
