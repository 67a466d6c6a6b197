"""Teacher views: the prompt as a teacher sees it.

same            the student's prompt, rendered with the teacher's tokenizer/template
teacher_prompt  the record's `teacher_prompt` field (falls back to the prompt)
privileged      the prompt plus privileged context (the reference answer / tests) from
                `privileged_template`; with `self_distill` this is on-policy self-distillation
template        the student's prompt under the teacher's own system prompt / chat format

Every view is scored on the *student's* response tokens, so only the prompt changes.
"""

from __future__ import annotations

import json

from uniopd.config import TeacherConfig
from uniopd.data.records import PromptRecord
from uniopd.models.prompts import Prompt, _text_of


def _prompt_text(prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(_text_of(m["content"]) for m in prompt if m.get("role") != "system")


def teacher_view(record: PromptRecord, cfg: TeacherConfig) -> Prompt:
    if cfg.view == "teacher_prompt" and record.teacher_prompt is not None:
        return record.teacher_prompt
    if cfg.view == "privileged":
        tests = record.tests if isinstance(record.tests, str) or record.tests is None else json.dumps(record.tests)
        text = cfg.privileged_template.format(prompt=_prompt_text(record.prompt), answer=record.answer or "",
                                              tests=tests or "")
        return text if isinstance(record.prompt, str) else [{"role": "user", "content": text}]
    return record.prompt
