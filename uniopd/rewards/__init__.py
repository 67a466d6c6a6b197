"""Verifiers: turn (response, prompt record) into an Outcome.

    from uniopd.rewards import verify_batch
    outcomes = verify_batch(responses, records)          # in input order

Built-in verifiers (by name): "exact", "choice" (in-process), "math" (math-verify in a
persistent worker pool with a per-item timeout), "code" (tests run in the process
sandbox, see docs/sandbox.md). Add your own with `@register_verifier("name")`.
"""

from uniopd.rewards.base import (
    DEFAULT_VERIFIER_BY_DOMAIN,
    Outcome,
    Verifier,
    get_verifier,
    known_verifiers,
    register_verifier,
    verifier_name_for,
    verify_batch,
)
from uniopd.rewards.code import CodeVerifier
from uniopd.rewards.exact import ChoiceVerifier, ExactMatchVerifier, extract_answer, extract_choice
from uniopd.rewards.math import MathVerifier, MathWorkerPool
from uniopd.rewards.sandbox import SandboxLimits, SandboxResult, isolation_available

__all__ = [
    "DEFAULT_VERIFIER_BY_DOMAIN",
    "ChoiceVerifier",
    "CodeVerifier",
    "ExactMatchVerifier",
    "MathVerifier",
    "MathWorkerPool",
    "Outcome",
    "SandboxLimits",
    "SandboxResult",
    "Verifier",
    "extract_answer",
    "extract_choice",
    "get_verifier",
    "isolation_available",
    "known_verifiers",
    "register_verifier",
    "verifier_name_for",
    "verify_batch",
]
