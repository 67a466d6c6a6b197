"""Teacher views: the prompt as a teacher sees it.

same            the student's prompt, rendered with the teacher's tokenizer/template
teacher_prompt  the record's `teacher_prompt` field (falls back to the prompt)
privileged      the prompt plus privileged context (the reference answer / tests) from
                `privileged_template`; with `self_distill` this is on-policy self-distillation
template        the student's prompt under the teacher's own system prompt / chat format
image_text      cross-modal: every image replaced by its text rendering from the record's
                `image_text` field (written with `image_template`), for a text-only teacher
                supervising a vision-language student

Every view is scored on the *student's* response tokens, so only the prompt changes.
A vision-language teacher also sees the record's images (`teacher_images`), except under
`image_text`, which replaces them; a text-only teacher never sees pixels.
"""

from __future__ import annotations

import json
import logging

from uniopd.config import ConfigError, TeacherConfig
from uniopd.data.records import PromptRecord
from uniopd.models.prompts import Prompt, _text_of, render_prompt

log = logging.getLogger(__name__)


def _prompt_text(prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(_text_of(m["content"]) for m in prompt if m.get("role") != "system")


def _image_parts(prompt: Prompt) -> list[dict]:
    if isinstance(prompt, str):
        return []
    return [p for m in prompt if isinstance(m.get("content"), list) for p in m["content"] if p.get("type") == "image"]


def teacher_view(record: PromptRecord, cfg: TeacherConfig) -> Prompt:
    if cfg.view == "image_text":
        return image_text_view(record, cfg.image_template)
    if cfg.view == "teacher_prompt" and record.teacher_prompt is not None:
        return record.teacher_prompt
    if cfg.view == "privileged":
        tests = record.tests if isinstance(record.tests, str) or record.tests is None else json.dumps(record.tests)
        text = cfg.privileged_template.format(prompt=_prompt_text(record.prompt), answer=record.answer or "",
                                              tests=tests or "")
        if isinstance(record.prompt, str):
            return text
        images = _image_parts(record.prompt)  # a vision teacher keeps the images of the prompt
        return [{"role": "user", "content": images + [{"type": "text", "text": text}] if images else text}]
    return record.prompt


class TeacherPrompts:
    """Token ids of a teacher's view of each record, rendered with the teacher's own tokenizer
    (or its processor, for a vision-language teacher) and cached per (record, view).

    One renderer for every backend: an in-process teacher and a client of a teacher server
    both score exactly these ids followed by the response, so a served teacher sees the
    prompt the local one would have seen, token for token.
    """

    def __init__(self, cfg: TeacherConfig, tokenizer, processor=None):
        self.cfg, self.tokenizer = cfg, tokenizer
        self._cache: dict[tuple[str, str], list[int]] = {}
        self.encoder = None
        if processor is not None:
            from uniopd.models.multimodal import PromptEncoder

            self.encoder = PromptEncoder(processor, chat_template=cfg.chat_template, system_prompt=cfg.system_prompt)

    def vision_inputs(self, record: PromptRecord):
        """(ids, MultimodalInputs) of a vision-language teacher's view of the record."""
        view = teacher_view(record, self.cfg)
        return self.encoder((record.id, self.cfg.view), record.id, view, teacher_images(record, self.cfg))

    def ids(self, record: PromptRecord) -> list[int]:
        key = (record.id, self.cfg.view)
        if key not in self._cache:
            if self.encoder is not None:
                self._cache[key] = self.vision_inputs(record)[0]
            else:
                self._cache[key] = render_prompt(self.tokenizer, teacher_view(record, self.cfg),
                                                 chat_template=self.cfg.chat_template,
                                                 system_prompt=self.cfg.system_prompt)
        return self._cache[key]


def teacher_images(record: PromptRecord, cfg: TeacherConfig) -> list[str]:
    """The `images` field as a vision-language teacher gets it under its view (image parts inside
    the view's messages come with the messages)."""
    return [] if cfg.view == "image_text" else list(record.images)


def image_texts(record: PromptRecord) -> list[str]:
    """One text per image of the record, in prompt order ('' where a single text covers them all)."""
    n = len(record.images) + len(_image_parts(record.prompt))
    if record.image_text is None:
        return [""] * n
    if isinstance(record.image_text, str):
        return [record.image_text] + [""] * (n - 1)
    return list(record.image_text)


def image_text_view(record: PromptRecord, template: str = "[image: {text}]") -> Prompt:
    """The prompt with every image written as text: `images`-field images go first (where a
    vision model sees them), image parts are replaced in place."""
    texts = iter(image_texts(record))

    def render(n: int) -> str:
        return "".join(template.format(text=t) + "\n" for t in (next(texts) for _ in range(n)) if t)

    head = render(len(record.images))
    if isinstance(record.prompt, str):
        return head + record.prompt
    out, placed = [], False
    for message in record.prompt:
        content = message["content"]
        if isinstance(content, list):
            content = "".join(render(1) if p.get("type") == "image" else p.get("text", "") for p in content)
        if not placed and message.get("role") == "user":
            content, placed = head + content, True
        out.append({**message, "content": content})
    return out


def check_views(records: list[PromptRecord], teacher_for, teachers: dict[str, TeacherConfig],
                vision_teachers: set[str] | None = None) -> None:
    """Before training: every record can be shown to its teacher. `teacher_for(record)` names
    the teacher; `vision_teachers` (once loaded) are those that see pixels: the others are
    warned about image records they will not see."""
    blind: dict[str, int] = {}
    for record in records:
        name = teacher_for(record)
        cfg = teachers[name]
        has_images = bool(record.images or _image_parts(record.prompt))
        if cfg.view == "image_text" and has_images and record.image_text is None:
            raise ConfigError(f"record {record.id!r}: teacher {name!r} uses view 'image_text' but the record has "
                              f"images and no 'image_text' field (a text rendering of its images)")
        if vision_teachers is not None and has_images and cfg.view != "image_text" and name not in vision_teachers:
            blind[name] = blind.get(name, 0) + 1
    for name, count in blind.items():
        log.warning("teacher %r is text-only and %d records have images it will not see; give the records "
                    "'image_text' and set teachers.%s.view=image_text for cross-modal distillation",
                    name, count, name)
