"""The prompt record: one line of a prompt file.

JSONL schema (one JSON object per line):

    id              str, required, unique in the file
    domain          str, required: picks the teacher and the default verifier
    prompt          str, or a list of chat messages {"role": str, "content": str | list}
    answer          str | number, optional: reference answer for the verifier
    tests           str | list[str] | dict, optional: code tests for the code verifier
    images          list[str], optional: image paths (relative to the file) or base64 data URIs
    image_text      str | list[str], optional: a text rendering of the images, one string per
                    image in prompt order (or one for all): what a text teacher reads instead
    teacher_prompt  str | list of messages, optional: the prompt as the teacher sees it
    verifier        str, optional: verifier name, overrides the domain default
    teacher         str, optional: teacher name, overrides routing by domain
    meta            dict, optional: anything else, carried through untouched

A record needs `answer` or `tests` unless it is only used for generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Message = dict[str, Any]


@dataclass
class PromptRecord:
    id: str
    domain: str
    prompt: str | list[Message]
    answer: str | None = None
    tests: Any = None
    images: list[str] = field(default_factory=list)
    image_text: str | list[str] | None = None
    teacher_prompt: str | list[Message] | None = None
    verifier: str | None = None
    teacher: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # Where the record was read ("train.jsonl:12"), for error messages; not data: never
    # written back by `to_json`, not compared.
    location: str | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "domain": self.domain, "prompt": self.prompt}
        for key in ("answer", "tests", "image_text", "teacher_prompt", "verifier", "teacher"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.images:
            out["images"] = list(self.images)
        if self.meta:
            out["meta"] = dict(self.meta)
        return out
