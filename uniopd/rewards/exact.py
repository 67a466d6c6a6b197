"""Exact-match and multiple-choice verifiers (in-process, cheap).

exact:  the answer is taken from the response as the content of the last \\boxed{...},
        else the text after the last "answer:" (any case), else the whole response; both
        sides are normalised (whitespace collapsed, lower case, trailing period and
        surrounding $ removed) and compared as numbers when both parse as numbers
        (exactly, with fractions: "579" == "579.0", "1/2" == "0.5", "1,000" == "1000").
choice: one letter A-J is extracted ("(B)", "B.", "Answer: B", "\\boxed{B}") and compared
        with the letter of record.answer.
"""

from __future__ import annotations

import re
from fractions import Fraction

from uniopd.data.records import PromptRecord
from uniopd.rewards.base import Outcome, register_verifier

_ANSWER_RE = re.compile(r"answer\s*:", re.IGNORECASE)
_NUMBER_RE = re.compile(r"[+-]?(\d{1,3}(,\d{3})+|\d+)?(\.\d+)?([eE][+-]?\d+)?")
_TEXT_WRAP_RE = re.compile(r"^\\(?:text|textbf|mathrm|mathbf)\{(.*)\}$", re.DOTALL)


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if absent."""
    best = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            best = text[m.end() : i - 1]
    return best


def extract_answer(response: str) -> str:
    """Last \\boxed{} content, else the text after the last "answer:", else the response."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed.strip()
    matches = list(_ANSWER_RE.finditer(response))
    if matches:
        return response[matches[-1].end() :].strip()
    return response.strip()


def normalize(text: str) -> str:
    s = " ".join(str(text).split()).strip()
    for _ in range(3):
        before = s
        if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
            s = s.strip("$").strip()
        m = _TEXT_WRAP_RE.match(s)
        if m:
            s = m.group(1).strip()
        s = s.rstrip(".").strip()
        if s == before:
            break
    return s.lower()


def as_number(text: str) -> Fraction | None:
    s = text.replace(" ", "")
    if not s:
        return None
    if "/" in s:
        num, _, den = s.partition("/")
        a, b = as_number(num), as_number(den)
        if a is None or b is None or b == 0:
            return None
        return a / b
    if not _NUMBER_RE.fullmatch(s) or not any(c.isdigit() for c in s):
        return None
    try:
        return Fraction(s.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: str, gold: str) -> bool:
    p, g = normalize(predicted), normalize(gold)
    if p == g:
        return True
    pn, gn = as_number(p), as_number(g)
    return pn is not None and gn is not None and pn == gn


@register_verifier("exact")
class ExactMatchVerifier:
    """Normalised exact match of the extracted answer against record.answer."""

    def verify(self, response: str, record: PromptRecord) -> Outcome:
        if record.answer is None:
            return Outcome.error(f"record {record.id!r} has no answer")
        predicted = extract_answer(response or "")
        if answers_match(predicted, str(record.answer)):
            return Outcome.passed()
        return Outcome.failed(f"answer {predicted[:80]!r} != {str(record.answer)[:80]!r}")

    def verify_many(self, responses: list[str], records: list[PromptRecord]) -> list[Outcome]:
        return [self.verify(r, rec) for r, rec in zip(responses, records)]


# ----------------------------------------------------------------------------- choice

_L = "A-J"
_CHOICE_PATTERNS = [
    # "Answer: B", "answer: (c)", "Final answer: **D**", "the answer is (C)"
    re.compile(rf"(?i:answer\s*:)\s*(?i:option\s*)?[\s*(\[]*([{_L}a-j])(?![A-Za-z])"),
    re.compile(rf"(?i:answer\s+is)\s*(?i:option\s*)?[\s*(\[]*([{_L}])(?![A-Za-z])"),
    re.compile(rf"\(([{_L}])\)"),  # "(B)"
    re.compile(rf"(?:^|\n)\s*\**([{_L}])\**\s*[.):]"),  # a line starting "B." / "B)" / "B:"
]


def extract_choice(text: str) -> str | None:
    """A single choice letter A-J from a response, or None."""
    text = text or ""
    boxed = last_boxed(text)
    if boxed is not None:
        inner = normalize(boxed).strip("() ").upper()
        if len(inner) == 1 and "A" <= inner <= "J":
            return inner
        m = re.match(rf"^\(?([{_L}])[).:\s]", boxed.strip() + " ")
        if m:
            return m.group(1)
    for pat in _CHOICE_PATTERNS:
        found = pat.findall(text)
        if found:
            return found[-1].upper()
    bare = text.strip().strip("*").strip().rstrip(".").strip("()[] ")
    if len(bare) == 1 and bare.upper() in "ABCDEFGHIJ":
        return bare.upper()
    return None


@register_verifier("choice")
class ChoiceVerifier:
    """Multiple choice: the extracted letter must equal record.answer's letter."""

    def verify(self, response: str, record: PromptRecord) -> Outcome:
        if record.answer is None:
            return Outcome.error(f"record {record.id!r} has no answer")
        gold = extract_choice(str(record.answer))
        if gold is None:
            return Outcome.error(f"record {record.id!r}: answer {record.answer!r} is not a choice letter A-J")
        got = extract_choice(response or "")
        if got is None:
            return Outcome.failed("no choice letter (A-J) found in the response")
        if got == gold:
            return Outcome.passed()
        return Outcome.failed(f"chose {got}, expected {gold}")

    def verify_many(self, responses: list[str], records: list[PromptRecord]) -> list[Outcome]:
        return [self.verify(r, rec) for r, rec in zip(responses, records)]
