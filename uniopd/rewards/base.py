"""Outcomes, the verifier registry, and batch verification.

A verifier turns (response, prompt record) into an `Outcome`. It is any object with

    verify(response: str, record: PromptRecord) -> Outcome

and optionally `verify_many(responses, records, *, num_workers, timeout_s)` for batching
(expensive verifiers use it to run a bounded pool). Verifiers are registered by name;
`verify_batch` picks one per record (`verifier_name_for`), groups the batch by verifier,
and returns outcomes in input order.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from uniopd.data.records import PromptRecord

STATUSES = ("pass", "fail", "timeout", "error")


@dataclass(frozen=True)
class Outcome:
    """The verdict on one response.

    correct: the response counts as correct (only ever True with status "pass").
    score:   in [0, 1]; 1.0 / 0.0 for the built-in verifiers.
    status:  "pass" | "fail" | "timeout" | "error" ("error": the verifier could not judge).
    reason:  why it is not a pass ("" for a pass).
    """

    correct: bool
    score: float
    status: str
    reason: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"Outcome.status must be one of {STATUSES}, got {self.status!r}")
        if not 0.0 <= float(self.score) <= 1.0:
            raise ValueError(f"Outcome.score must be in [0, 1], got {self.score!r}")
        if self.correct and self.status != "pass":
            raise ValueError(f"a correct Outcome must have status 'pass', got {self.status!r}")

    @classmethod
    def passed(cls, score: float = 1.0) -> Outcome:
        return cls(True, score, "pass", "")

    @classmethod
    def failed(cls, reason: str, score: float = 0.0) -> Outcome:
        return cls(False, score, "fail", reason)

    @classmethod
    def timeout(cls, reason: str = "timed out") -> Outcome:
        return cls(False, 0.0, "timeout", reason)

    @classmethod
    def error(cls, reason: str) -> Outcome:
        return cls(False, 0.0, "error", reason)


@runtime_checkable
class Verifier(Protocol):
    def verify(self, response: str, record: PromptRecord) -> Outcome: ...


# ----------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Any] = {}  # name -> class, function or instance, as registered
_INSTANCES: dict[str, Verifier] = {}


class _FunctionVerifier:
    """Wraps `f(response, record) -> Outcome | bool | float` as a verifier."""

    def __init__(self, fn: Callable[[str, PromptRecord], Any], name: str) -> None:
        self.fn = fn
        self.name = name

    def verify(self, response: str, record: PromptRecord) -> Outcome:
        return as_outcome(self.fn(response, record))


def as_outcome(value: Any) -> Outcome:
    """Coerce what a user verifier returns (Outcome, bool or a score in [0, 1])."""
    if isinstance(value, Outcome):
        return value
    if isinstance(value, bool):
        return Outcome.passed() if value else Outcome.failed("incorrect")
    if isinstance(value, (int, float)):
        score = float(value)
        if not 0.0 <= score <= 1.0:
            return Outcome.error(f"verifier returned a score outside [0, 1]: {score}")
        return Outcome.passed(score) if score >= 1.0 else Outcome.failed("partial score", score)
    return Outcome.error(f"verifier returned {type(value).__name__}, expected Outcome, bool or float")


def register_verifier(name: str) -> Callable[[Any], Any]:
    """Decorator: register a verifier class (instantiated without arguments on first use),
    a function `f(response, record)`, or an instance, under `name`."""

    def deco(obj: Any) -> Any:
        if not isinstance(name, str) or not name:
            raise ValueError(f"verifier name must be a non-empty string, got {name!r}")
        _REGISTRY[name] = obj
        _INSTANCES.pop(name, None)
        return obj

    return deco


def known_verifiers() -> list[str]:
    return sorted(_REGISTRY)


def get_verifier(name: str) -> Verifier:
    """The verifier registered under `name` (classes are instantiated once, then cached)."""
    if name in _INSTANCES:
        return _INSTANCES[name]
    if name not in _REGISTRY:
        raise KeyError(f"unknown verifier {name!r}; known verifiers: {', '.join(known_verifiers())}")
    obj = _REGISTRY[name]
    if inspect.isclass(obj):
        inst = obj()
    elif hasattr(obj, "verify"):
        inst = obj
    elif callable(obj):
        inst = _FunctionVerifier(obj, name)
    else:
        raise TypeError(f"verifier {name!r} is neither a class, a function nor an object with verify()")
    _INSTANCES[name] = inst
    return inst


DEFAULT_VERIFIER_BY_DOMAIN = {
    "math": "math",
    "arithmetic": "exact",
    "code": "code",
    "choice": "choice",
    "mcq": "choice",
}


def verifier_name_for(record: PromptRecord, domain_defaults: dict[str, str] | None = None) -> str:
    """record.verifier, else domain_defaults[domain], else the built-in map by domain,
    else "math" when the record has an answer, "code" when it has tests."""
    if record.verifier:
        return record.verifier
    if domain_defaults and record.domain in domain_defaults:
        return domain_defaults[record.domain]
    if record.domain in DEFAULT_VERIFIER_BY_DOMAIN:
        return DEFAULT_VERIFIER_BY_DOMAIN[record.domain]
    if record.answer is not None:
        return "math"
    if record.tests is not None:
        return "code"
    raise ValueError(
        f"no verifier for record {record.id!r} (domain {record.domain!r}): it sets no `verifier`, "
        f"the domain has no default (built-in defaults: {DEFAULT_VERIFIER_BY_DOMAIN}), "
        "and it has neither an `answer` nor `tests`"
    )


# ----------------------------------------------------------------------------- batching


def _accepted_kwargs(fn: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _run_group(verifier: Verifier, responses: list[str], records: list[PromptRecord], num_workers: int, timeout_s: float) -> list[Outcome]:
    many = getattr(verifier, "verify_many", None)
    if many is not None:
        try:
            outs = many(responses, records, **_accepted_kwargs(many, {"num_workers": num_workers, "timeout_s": timeout_s}))
            outs = [as_outcome(o) for o in outs]
            if len(outs) != len(responses):
                raise RuntimeError(f"verify_many returned {len(outs)} outcomes for {len(responses)} responses")
            return outs
        except Exception as exc:  # noqa: BLE001 - one broken verifier must not sink the batch
            return [Outcome.error(f"verifier failed: {exc!r}")] * len(responses)
    outs = []
    for response, record in zip(responses, records):
        try:
            outs.append(as_outcome(verifier.verify(response, record)))
        except Exception as exc:  # noqa: BLE001
            outs.append(Outcome.error(f"verifier failed: {exc!r}"))
    return outs


def verify_batch(
    responses: list[str],
    records: list[PromptRecord],
    *,
    domain_defaults: dict[str, str] | None = None,
    num_workers: int = 2,
    timeout_s: float = 5.0,
) -> list[Outcome]:
    """Verify responses[i] against records[i]; outcomes come back in input order.

    Records are grouped by verifier name; each group goes to the verifier's `verify_many`
    when it has one (math: persistent worker pool with a per-item timeout; code: sandboxed
    runs on a bounded pool), otherwise to `verify` in this process, one by one.
    A verifier that raises turns into status "error" outcomes; an unknown verifier name or a
    record with no verifier raises (KeyError / ValueError) before anything runs.
    """
    if len(responses) != len(records):
        raise ValueError(f"verify_batch: {len(responses)} responses but {len(records)} records")
    if num_workers < 1:
        raise ValueError(f"verify_batch: num_workers must be >= 1, got {num_workers}")
    groups: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault(verifier_name_for(record, domain_defaults), []).append(i)
    verifiers = {name: get_verifier(name) for name in groups}
    out: list[Outcome | None] = [None] * len(responses)
    for name, idx in groups.items():
        resp = [responses[i] if responses[i] is not None else "" for i in idx]
        recs = [records[i] for i in idx]
        for i, outcome in zip(idx, _run_group(verifiers[name], resp, recs, num_workers, timeout_s)):
            out[i] = outcome
    return out  # type: ignore[return-value]
