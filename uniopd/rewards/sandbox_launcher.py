"""The sandbox launcher: the stdlib-only script `uniopd.rewards.sandbox.run` starts as
`python -I -S sandbox_launcher.py CONFIG STATUS_FD RUN_ID` (see sandbox.py and docs/sandbox.md).

    launcher   outside every cgroup of the run; dies with its caller (PR_SET_PDEATHSIG) and
               then kills the run and removes its files; its own wall-clock timer
      └─ monitor   pid 1 of a new PID namespace; new mount/net/IPC/UTS namespaces; builds the
                   private root; enforces the deadline; reports on the status pipe
           └─ program   joins the run's cgroups, rlimits, unprivileged uid, no_new_privs, exec

Only the launcher and the monitor write the status pipe: the program never holds it, and a
start failure travels on a close-on-exec pipe of its own, not on the program's stderr or exit
code, so nothing the program prints or returns can pass for the sandbox's own verdict.
"""

from __future__ import annotations

# Light stdlib imports only: the launcher starts once per sandboxed run.
import ctypes
import fcntl
import json
import os
import resource
import select
import shutil
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
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38

# glibc has no pivot_root wrapper; the syscall number depends on the architecture.
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "loongarch64": 41, "i686": 217, "i386": 217,
                   "s390x": 217, "ppc64le": 203, "ppc64": 203, "armv7l": 218}

_MOUNT_OPT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                    "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}

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
_START_FAILURE = "sandbox: could not start the program"
_INSIDE_WORKDIR = "/tmp"  # the workdir's path inside the private root
_DEV_NODES = ("null", "zero", "full", "random", "urandom")
_LAUNCHER_GRACE_S = 0.5  # the monitor kills at the deadline; the launcher only if it did not


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


# ----------------------------------------------------------------------------- shared with the caller


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


def _remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if os.path.exists(path):  # e.g. directories the program made read-only (host workdir)
        for root, dirs, _ in os.walk(path):
            for d in dirs:
                try:
                    os.chmod(os.path.join(root, d), 0o700)
                except OSError:
                    pass
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- mounts


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


def _bind(libc, src: str, dst: str) -> None:
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "a").close()
    # Recursive: a non-recursive bind of a tree with locked submounts (user namespace) fails.
    _mount(libc, src, dst, None, MS_BIND | MS_REC)


def _build_root(libc, cfg, iso, uid_owner: str) -> str:
    """A new root holding only the interpreter, its stdlib, system libraries, a few /dev nodes,
    /proc and a fresh tmpfs workdir, all read-only but the workdir; pivot into it."""
    spec, new = cfg["root"], cfg["root_dir"]
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    _mount(libc, "tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    # The workdir first: a bind below it (a venv under /tmp) then lands on it instead of under it.
    work = new + _INSIDE_WORKDIR
    os.makedirs(work, exist_ok=True)
    _mount(libc, "tmpfs", work, "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['limits']['tmpfs_mb']}m,mode=0700{uid_owner}")
    _copy_files(cfg, work)
    for src, dst in spec["binds"]:
        _bind(libc, src, new + dst)
    for path in spec["masks"]:  # installed packages: an empty directory in their place
        if os.path.isdir(new + path):
            _mount(libc, "tmpfs", new + path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0755")
    # Links last, so that no bind above goes through one (their targets are relative).
    for link, target in spec["links"]:
        os.makedirs(os.path.dirname(new + link), exist_ok=True)
        os.symlink(target, new + link)
    dev = new + "/dev"
    os.makedirs(dev, exist_ok=True)
    _mount(libc, "tmpfs", dev, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k,mode=0755")
    for node in _DEV_NODES:
        if os.path.exists("/dev/" + node):
            _bind(libc, "/dev/" + node, f"{dev}/{node}")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{dev}/{name}")
    proc = new + "/proc"
    if iso["pidns"]:  # a /proc of this PID namespace only; none at all without one
        os.makedirs(proc, exist_ok=True)
        _mount(libc, "proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for point, flags in _mount_table():
        if (point == new or point.startswith(new + "/")) and point not in (work, proc):
            _mount(libc, None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
    os.chdir(new)
    nr = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if nr is not None and libc.syscall(nr, b".", b".") == 0:
        _check(libc.umount2(b".", MNT_DETACH), "umount old root")
    else:  # pivot_root refused (e.g. a rootfs root): move the new root over / and chroot
        _mount(libc, ".", "/", None, 1 << 13)  # MS_MOVE
        os.chroot(".")
    os.chdir("/")
    iso["private_root"] = iso["readonly_fs"] = iso["masked_home"] = iso["tmpfs_workdir"] = True
    return _INSIDE_WORKDIR


def _copy_files(cfg, dest) -> None:
    src = cfg["srcdir"]
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as fi, open(os.path.join(dest, name), "wb") as fo:
            fo.write(fi.read())
        os.chmod(os.path.join(dest, name), 0o644)


def _host_workdir(cfg) -> str:
    """Fallback without a mount namespace: a plain directory, reachable by the sandbox uid."""
    work = os.path.join(cfg["run_dir"], "work")
    os.mkdir(work, 0o700)
    _copy_files(cfg, work)
    if cfg["uid"] is not None:
        os.chmod(cfg["run_dir"], 0o711)  # traversable; the files in it stay 0600
        os.chown(work, cfg["uid"], cfg["gid"])
    return work


def _set_rlimits(lim) -> None:
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


# ----------------------------------------------------------------------------- launcher


class _CallerGone(Exception):
    pass


def _caller_gone(signum, frame):
    raise _CallerGone()


def _wait_until(pid: int, deadline: float) -> int | None:
    """waitpid(pid) until the monotonic `deadline`; None if it passed first."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = -1
    try:
        while True:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                return st
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if pidfd >= 0:
                select.select([pidfd], [], [], left)
            else:
                time.sleep(min(left, 0.01))
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def _stop_run(monitor: int | None, cfg) -> None:
    if monitor:
        try:
            os.kill(monitor, signal.SIGKILL)  # pid 1 of the PID namespace: all of it goes
        except OSError:
            pass
    for _, path in cfg["cgroups"]:
        _kill_cgroup(path)
    if monitor:
        try:
            os.waitpid(monitor, 0)
        except ChildProcessError:
            pass


def _launcher_main(cfg_path: str, status_fd: int) -> None:
    cfg = json.load(open(cfg_path))
    libc = _libc()
    # The caller's death (SIGKILL, OOM) reaches us as SIGTERM: kill the run, remove its files.
    blocked = {signal.SIGTERM, signal.SIGHUP}
    for sig in blocked:
        signal.signal(sig, _caller_gone)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    monitor = None
    try:
        if os.getppid() != cfg["caller_pid"]:
            raise _CallerGone()
        iso = _unshare_pid(libc, cfg)
        # After the uid map is written (it needs us dumpable): from here on no same-uid
        # program may open our fds (the status pipe) through /proc or ptrace us.
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
        data_r = -1
        if cfg["fd3_data"] is not None:
            data_r, data_w = os.pipe()
            os.write(data_w, bytes.fromhex(cfg["fd3_data"]))
            os.close(data_w)
        signal.pthread_sigmask(signal.SIG_BLOCK, blocked)  # so `monitor` is set before any raise
        launcher_pid = os.getpid()
        monitor = os.fork()
        if monitor == 0:
            try:
                for sig in blocked:
                    signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
                _monitor_main(libc, cfg, iso, status_fd, data_r, launcher_pid)
            finally:
                os._exit(70)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
        if data_r >= 0:
            os.close(data_r)
        st = _wait_until(monitor, cfg["deadline"] + _LAUNCHER_GRACE_S)
        if st is None:
            _report(status_fd, {"timed_out": True})
            _stop_run(monitor, cfg)
        elif os.WIFSIGNALED(st):
            _report(status_fd, {"monitor_signal": os.WTERMSIG(st)})
    except _CallerGone:
        for sig in blocked:
            signal.signal(sig, signal.SIG_IGN)
        _stop_run(monitor, cfg)
        for _, path in cfg["cgroups"]:
            _remove_cgroup(path)
        _remove_tree(cfg["run_dir"])
        try:  # stragglers of the program in our process group (no PID namespace), and us
            os.killpg(os.getpgrp(), signal.SIGKILL)
        finally:
            os._exit(0)
    os._exit(0)


def _unshare_pid(libc, cfg) -> dict[str, bool]:
    """PID namespace (with a user namespace when not root): it must be made by the parent of
    its pid 1. The monitor makes the others, so that the launcher stays in the host's mounts."""
    iso = {"userns": False, "pidns": False}
    if not cfg.get("namespaces", True):
        return iso
    if os.geteuid() == 0:
        iso["pidns"] = libc.unshare(CLONE_NEWPID) == 0
        return iso
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWPID) == 0:
        iso["userns"] = iso["pidns"] = True
        try:
            _write("/proc/self/setgroups", "deny")
        except OSError:
            pass
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    return iso


# ----------------------------------------------------------------------------- monitor


def _monitor_main(libc, cfg, iso, status_fd, data_r, launcher_pid) -> None:
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if not iso["pidns"] and os.getppid() != launcher_pid:
        os._exit(71)  # launcher already gone
    # As pid 1, SIG_DFL means "ignored" for signals sent from inside the namespace.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    is_root = os.geteuid() == 0
    userns = iso["userns"]
    want = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | (0 if cfg["network"] else CLONE_NEWNET)
    got = 0
    if cfg.get("namespaces", True) and (is_root or userns):
        if libc.unshare(want) == 0:
            got = want
        else:
            for flag in (CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWIPC, CLONE_NEWUTS):
                if want & flag and libc.unshare(flag) == 0:
                    got |= flag
    iso.update(netns=bool(got & CLONE_NEWNET), ipcns=bool(got & CLONE_NEWIPC), utsns=bool(got & CLONE_NEWUTS),
               mountns=bool(got & CLONE_NEWNS), private_root=False, readonly_fs=False, masked_home=False,
               tmpfs_workdir=False)
    # The program joins the cgroups itself, through files opened before /sys leaves its view.
    cg_fds = []
    for kind, path in cfg["cgroups"]:
        try:
            cg_fds.append((kind, os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY)))
        except OSError:
            pass
    for kind in ("pids", "memory"):
        iso["cgroup_" + kind] = any(k == kind for k, _ in cg_fds)
    drop_uid = is_root and cfg["uid"] is not None
    owner = f",uid={cfg['uid']},gid={cfg['gid']}" if drop_uid else ""
    os.umask(0o022)  # the private root's directories must be enterable by the sandbox uid
    workdir = None
    if iso["mountns"]:
        try:
            workdir = _build_root(libc, cfg, iso, owner)
        except OSError as exc:  # fall back to the host's file system and a plain workdir
            _report(status_fd, {"mount_error": str(exc)})
    if workdir is None:
        workdir = _host_workdir(cfg)
    iso.update(uid=drop_uid, no_new_privs=True, rlimits=True, nproc_enforced=drop_uid or not is_root or userns)
    _report(status_fd, {"isolation": iso})
    if not iso["pidns"]:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    env = dict(cfg["env"], HOME=workdir, TMPDIR=workdir)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # for sigtimedwait below
    err_r, err_w = os.pipe()  # close-on-exec: empty at EOF means the exec succeeded
    child = os.fork()
    if child == 0:
        err = -1
        try:
            err = fcntl.fcntl(err_w, fcntl.F_DUPFD_CLOEXEC, 10)  # above every fd the program keeps
            _exec_program(libc, cfg, workdir, env, data_r, err, cg_fds, drop_uid)
        except BaseException as exc:  # noqa: BLE001
            try:
                os.write(err if err >= 0 else err_w, f"{exc}".encode()[:2000] or b"?")
            finally:
                os._exit(127)
    os.close(err_w)
    for _, fd in cg_fds:
        os.close(fd)
    if data_r >= 0:
        os.close(data_r)
    start_error = b""
    while chunk := os.read(err_r, 4096):
        start_error += chunk
    os.close(err_r)
    status: dict[str, Any] = {"exit": None, "signal": None}
    if start_error:
        status["start_error"] = start_error.decode("utf-8", "replace")
    while True:
        try:
            pid, st = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == child:
            if os.WIFEXITED(st):
                status.update(exit=os.WEXITSTATUS(st))
            elif os.WIFSIGNALED(st):
                status.update(signal=os.WTERMSIG(st))
            break
        if pid:
            continue  # an orphan reaped; look for more
        left = cfg["deadline"] - time.monotonic()
        if left <= 0:
            os.kill(child, signal.SIGKILL)
            status["timed_out"] = True
            left = 1.0
        signal.sigtimedwait({signal.SIGCHLD}, min(left, 1.0))
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


def _exec_program(libc, cfg, workdir, env, data_r, err, cg_fds, drop_uid) -> None:
    # First into the run's cgroups, so that everything the program does is counted there,
    # while the launcher and the monitor stay outside its memory limit.
    for _, fd in cg_fds:
        os.write(fd, b"0")
        os.close(fd)
    if data_r >= 0:
        if data_r != 3:
            os.dup2(data_r, 3, inheritable=True)
        else:
            os.set_inheritable(3, True)
        low = 4
    else:
        low = 3
    # The status pipe, the run's lock and every other fd go: only 0, 1, 2 (and 3) remain.
    os.closerange(low, err)
    os.closerange(err + 1, 65536)
    _set_rlimits(cfg["limits"])
    if drop_uid:
        os.setgroups([])
        os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
        os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    os.chdir(workdir)
    os.execve(cfg["exe"], cfg["argv"], env)


if __name__ == "__main__":
    _launcher_main(sys.argv[1], int(sys.argv[2]))
    raise SystemExit(0)
