"""Math verifier: math-verify's parse + verify in a persistent pool of worker processes.

math-verify bounds its own work with SIGALRM, which only works on the main thread of the
main interpreter. So workers call `parse(..., parsing_timeout=None)` and
`verify(..., timeout_seconds=None)` (its timeouts off) and the time limit is enforced from
outside, per item: a worker that overruns is killed (SIGKILL to its process group) and
replaced, and the item is reported as status "timeout". The pool lives for the whole
process (workers import sympy once, ~1 s) and is shut down at exit.

Before going to the pool, an in-process fast path accepts a response whose extracted
answer (last \\boxed{}, else after "answer:") equals the gold answer as a string (spaces
ignored) or as an exact number; everything else goes to math-verify.

A worker is `python -c "from uniopd.rewards.math import _worker_main; _worker_main()"`:
it reads one JSON request per line on stdin and writes one JSON result per line on stdout.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from uniopd.data.records import PromptRecord
from uniopd.rewards.base import Outcome, register_verifier
from uniopd.rewards.exact import as_number, extract_answer

_PKG_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_WORKER_MEMORY_BYTES = 4 << 30  # RLIMIT_AS of a worker: sympy blow-ups fail, not the host
_STARTUP_TIMEOUT_S = 120.0


# ----------------------------------------------------------------------------- worker side


def _parse_gold(gold: str, parse):
    if "\\boxed" in gold or "$" in gold:
        return parse(gold, parsing_timeout=None)
    return parse("\\boxed{" + gold + "}", parsing_timeout=None) or parse(gold, parsing_timeout=None)


def check_math(gold: str, response: str) -> tuple[str, str]:
    """(status, reason) for one response; runs math-verify with its timeouts off.

    Call it only in a process you can kill (a pool worker): it has no time bound itself.
    """
    from math_verify import parse, verify

    gold_parsed = _parse_gold(gold, parse)
    if not gold_parsed:
        return "error", f"could not parse the gold answer {gold[:80]!r}"
    pred = parse(response, parsing_timeout=None)
    if not pred:
        return "fail", "no answer found in the response"
    if verify(gold_parsed, pred, timeout_seconds=None):
        return "pass", ""
    return "fail", f"answer {str(pred[-1])[:80]!r} != {gold[:80]!r}"


def _worker_main() -> None:
    # Keep the protocol channel private: anything printed by libraries goes to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Die with the parent even while busy inside sympy. (Not PR_SET_PDEATHSIG: that fires
    # when the parent *thread* that started us exits, and the pool outlives its callers.)
    parent = os.getppid()

    def watchdog() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (_WORKER_MEMORY_BYTES, _WORKER_MEMORY_BYTES))
    except (ImportError, ValueError, OSError):
        pass
    try:
        import logging

        logging.disable(logging.CRITICAL)
        import math_verify  # noqa: F401

        check_math("1", "\\boxed{1}")  # warm up the parsers
    except BaseException as exc:  # noqa: BLE001
        proto.write(json.dumps({"ready": False, "error": repr(exc)}) + "\n")
        return
    proto.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            status, reason = check_math(req["gold"], req["response"])
        except MemoryError:
            status, reason = "error", "math-verify ran out of memory"
        except Exception as exc:  # noqa: BLE001
            status, reason = "error", f"math-verify failed: {exc!r}"[:300]
        proto.write(json.dumps({"i": req["i"], "status": status, "reason": reason}) + "\n")


# ----------------------------------------------------------------------------- pool


class _Worker:
    def __init__(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = _PKG_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from uniopd.rewards.math import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=_PKG_ROOT,
            env=env,
            start_new_session=True,
        )
        self.started = time.monotonic()
        self.ready = False
        self.error = ""
        self.buf = b""
        self.task: int | None = None
        self.deadline = 0.0

    def fileno(self) -> int:
        return self.proc.stdout.fileno()

    def send(self, obj: dict[str, Any]) -> None:
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()

    def read(self) -> list[dict[str, Any]] | None:
        """Messages available now; None at EOF (the worker died)."""
        chunk = os.read(self.fileno(), 1 << 16)
        if not chunk:
            return None
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        return [json.loads(x) for x in lines if x.strip()]

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


class MathWorkerPool:
    """A fixed number of persistent math-verify worker processes with a per-item timeout."""

    def __init__(self, num_workers: int = 2) -> None:
        if num_workers < 1:
            raise ValueError(f"MathWorkerPool: num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self.workers: list[_Worker] = []
        self.lock = threading.Lock()
        self.restarts = 0

    def _fill(self) -> None:
        while len(self.workers) < self.num_workers:
            self.workers.append(_Worker())

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self.workers.remove(w)
        self.restarts += 1
        self._fill()

    def map(self, items: list[tuple[str, str]], timeout_s: float) -> list[tuple[str, str]]:
        """[(gold, response)] -> [(status, reason)], in order. Each item gets `timeout_s`
        seconds of a worker's time; an item that overruns is killed and reported as timeout."""
        with self.lock:
            return self._map(items, timeout_s)

    def _map(self, items: list[tuple[str, str]], timeout_s: float) -> list[tuple[str, str]]:
        results: list[tuple[str, str] | None] = [None] * len(items)
        queue = collections.deque(range(len(items)))
        left = len(items)
        start_failures = 0
        self._fill()
        while left:
            now = time.monotonic()
            for w in self.workers:
                if w.ready and w.task is None and queue:
                    i = queue.popleft()
                    gold, response = items[i]
                    w.task, w.deadline = i, time.monotonic() + timeout_s
                    try:
                        w.send({"i": i, "gold": gold, "response": response})
                    except OSError:
                        pass  # the worker is dead; its EOF is handled below
            waits = [w.deadline for w in self.workers if w.task is not None]
            waits += [w.started + _STARTUP_TIMEOUT_S for w in self.workers if not w.ready]
            timeout = max(0.0, min(waits) - time.monotonic()) if waits else 0.1
            with selectors.DefaultSelector() as sel:
                for w in self.workers:
                    sel.register(w.fileno(), selectors.EVENT_READ, w)
                events = sel.select(timeout=min(timeout, 1.0))
            for key, _ in events:
                w = key.data
                try:
                    msgs = w.read()
                except (OSError, ValueError):
                    msgs = None
                if msgs is None:  # died
                    if w.task is not None:
                        results[w.task] = ("error", "math worker died (out of memory or crashed)")
                        left -= 1
                    elif not w.ready:
                        start_failures += 1
                    self._replace(w)
                    continue
                for msg in msgs:
                    if "ready" in msg:
                        w.ready = bool(msg["ready"])
                        if not w.ready:
                            w.error = msg.get("error", "")
                    elif w.task is not None and msg.get("i") == w.task:
                        results[w.task] = (msg["status"], msg["reason"])
                        w.task = None
                        left -= 1
                if w.error:
                    start_failures += 1
                    err = w.error
                    self._replace(w)
                    if start_failures >= 3:
                        return self._fail_rest(results, f"math worker could not start: {err}")
            now = time.monotonic()
            for w in list(self.workers):
                if w.task is not None and now > w.deadline:
                    results[w.task] = ("timeout", f"math verification took longer than {timeout_s:g}s")
                    left -= 1
                    w.task = None
                    self._replace(w)
                elif not w.ready and now > w.started + _STARTUP_TIMEOUT_S:
                    start_failures += 1
                    self._replace(w)
            if start_failures >= 3:
                return self._fail_rest(results, "math workers failed to start")
        return results  # type: ignore[return-value]

    @staticmethod
    def _fail_rest(results, reason):
        return [r if r is not None else ("error", reason) for r in results]

    def close(self) -> None:
        with self.lock:
            for w in self.workers:
                w.kill()
            self.workers = []


_POOLS: dict[int, MathWorkerPool] = {}
_POOLS_LOCK = threading.Lock()


def get_pool(num_workers: int = 2) -> MathWorkerPool:
    """The process-wide pool with `num_workers` workers (created on first use)."""
    with _POOLS_LOCK:
        if num_workers not in _POOLS:
            _POOLS[num_workers] = MathWorkerPool(num_workers)
        return _POOLS[num_workers]


@atexit.register
def close_pools() -> None:
    with _POOLS_LOCK:
        for pool in _POOLS.values():
            pool.close()
        _POOLS.clear()


# ----------------------------------------------------------------------------- verifier

def _fast_match(gold: str, response: str) -> bool:
    got = extract_answer(response)
    g, r = "".join(gold.split()).strip("$").rstrip("."), "".join(got.split()).strip("$").rstrip(".")
    if g == r and g:
        return True
    gn, rn = as_number(g), as_number(r)
    return gn is not None and rn is not None and gn == rn

def _to_outcome(status: str, reason: str) -> Outcome:
    if status == "pass":
        return Outcome.passed()
    if status == "fail":
        return Outcome.failed(reason)
    if status == "timeout":
        return Outcome.timeout(reason)
    return Outcome.error(reason)

@register_verifier("math")
class MathVerifier:
    """math-verify equivalence of the response's final answer and record.answer."""

    def __init__(self, timeout_s: float = 5.0, num_workers: int = 2) -> None:
        self.timeout_s = timeout_s
        self.num_workers = num_workers

    def verify(self, response: str, record: PromptRecord) -> Outcome:
        return self.verify_many([response], [record])[0]

    def verify_many(
        self,
        responses: list[str],
        records: list[PromptRecord],
        *,
        num_workers: int | None = None,
        timeout_s: float | None = None,
    ) -> list[Outcome]:
        out: list[Outcome | None] = [None] * len(responses)
        todo: list[int] = []
        for i, (response, record) in enumerate(zip(responses, records)):
            if record.answer is None:
                out[i] = Outcome.error(f"record {record.id!r} has no answer")
            elif _fast_match(str(record.answer), response or ""):
                out[i] = Outcome.passed()
            else:
                todo.append(i)
        if todo:
            pool = get_pool(num_workers or self.num_workers)
            items = [(str(records[i].answer), responses[i] or "") for i in todo]
            for i, (status, reason) in zip(todo, pool.map(items, timeout_s or self.timeout_s)):
                out[i] = _to_outcome(status, reason)
        return out  # type: ignore[return-value]
