"""Adversarial programs against the sandbox: each test asserts the harm did NOT happen.

What a test relies on is read from `isolation_available()`; a test that needs a
protection this machine cannot give is skipped with the reason.
"""

from __future__ import annotations

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

from uniopd.data.records import PromptRecord
from uniopd.rewards import CodeVerifier
from uniopd.rewards.sandbox import SandboxLimits, isolation_available, run_python

ISO = isolation_available()
FAST = SandboxLimits(timeout_s=1.5, memory_mb=512, group_memory_mb=768, nproc=16, output_bytes=64 * 1024, tmpfs_mb=16, fsize_mb=4)


def _processes_of_run(run_id: str) -> list[int]:
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
        left = _processes_of_run(res.run_id) + _processes_of_uid(res.uid)
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
    res = _run(
        """
        chunks = []
        while True:
            chunks.append(b"x" * (32 * 1024 * 1024))
        """
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
    assert b"DID" not in res.stdout, res.stdout


def test_root_owned_world_writable_files_survive_only_with_readonly_view(world_writable_dir):
    # As root a file in a 0777 directory could be removed by anyone; the read-only
    # mount is what stops it.
    if not ISO["readonly_fs"]:
        pytest.skip("no mount namespace: the read-only view is unavailable here")
    canary = os.path.join(world_writable_dir, "root-owned")
    open(canary, "w").write("keep")
    res = _run(f"import os\nos.remove({canary!r})\n")
    assert os.path.exists(canary)
    assert b"Read-only file system" in res.stderr


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


def test_interpreter_under_a_private_directory_is_made_reachable(tmp_path):
    """A venv inside a 0700 directory (e.g. made under `mktemp -d`) must still run sandboxed code."""
    import stat as stat_mod

    from uniopd.rewards.sandbox import _dirs_to_hide

    private = tmp_path / "private"
    venv = private / "venv"
    venv.mkdir(parents=True)
    private.chmod(0o700)
    hide = _dirs_to_hide([str(venv)])
    assert hide[:2] == ["/root", "/home"]
    extra = hide[2:]
    assert len(extra) == 1 and str(venv).startswith(extra[0] + "/")
    assert not (private.parent.stat().st_mode & stat_mod.S_IXOTH) or extra[0] == str(private)
