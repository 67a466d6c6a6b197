"""Start-up work shared by train, eval and balance: load prompt records, tokenize prompts.

Prompts longer than the prompt limit follow `data.overlong`: "error" names the record,
"truncate" keeps the last tokens (the part next to the response), "skip" drops the record;
truncated and skipped records are counted and reported, never silently lost. The limit is
`model.max_prompt_tokens`, or less where the rollout engine has less room
(`RolloutEngine.prompt_limit`: a vLLM engine's max_model_len minus rollout.max_new_tokens), so
a prompt the engine could not take meets the same policy here instead of failing inside it.
Prompts with images (a vision-language student, `encode` given) are never truncated: a
cut could split an image's placeholder tokens; "truncate" is an error for them.

Characters are checked before tokens: tokenising costs hundreds of bytes per character, so
a 10 MB prompt would take gigabytes before its length is known. A prompt of more than
CHARS_PER_TOKEN * max_prompt_tokens characters cannot fit (no real tokenizer averages that
many characters per token) and meets the policy untokenised; "truncate" first keeps its last
that many characters (the kept record carries the cut prompt, so teachers never tokenise
the whole either), then cuts tokens as usual.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from uniopd.config import DataConfig, ModelConfig
from uniopd.data.records import PromptRecord
from uniopd.models.prompts import render_prompt

log = logging.getLogger(__name__)


CHARS_PER_TOKEN = 64


class PromptTooLong(ValueError):
    pass


@dataclass(frozen=True)
class PromptLimit:
    """The longest prompt in tokens, and the keys that set it (named in every overlong message)."""

    tokens: int
    keys: str  # e.g. "model.max_prompt_tokens=1024"

    @classmethod
    def of(cls, model_cfg: ModelConfig) -> "PromptLimit":
        return cls(model_cfg.max_prompt_tokens, f"model.max_prompt_tokens={model_cfg.max_prompt_tokens}")


def _where(record: PromptRecord) -> str:
    return f"{record.location}: record {record.id!r}" if record.location else f"record {record.id!r}"


def _text_chars(prompt) -> int:
    if isinstance(prompt, str):
        return len(prompt)
    total = 0
    for msg in prompt:
        content = msg.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p.get("text") or "") for p in content if p.get("type") == "text")
    return total


def _keep_last_chars(prompt, budget: int):
    """The prompt with text cut from its start until at most `budget` characters remain
    (messages and image parts stay; their earliest text goes first)."""
    def cut(text: str) -> str:
        nonlocal budget
        kept = text[max(0, len(text) - budget):]
        budget -= len(kept)
        return kept

    if isinstance(prompt, str):
        return cut(prompt)
    out = []
    for msg in reversed(prompt):
        content = msg.get("content")
        if isinstance(content, str):
            msg = {**msg, "content": cut(content)}
        elif isinstance(content, list):
            parts = [{**p, "text": cut(p.get("text") or "")} if p.get("type") == "text" else p
                     for p in reversed(content)]
            msg = {**msg, "content": parts[::-1]}
        out.append(msg)
    return out[::-1]


def load_prompt_records(data_cfg: DataConfig, path: str | None, *, require_target: bool = True) -> list[PromptRecord]:
    from uniopd.data.loader import load_records
    from uniopd.data.validate import RecordError

    if not path:
        raise ValueError("data.train is empty: name a prompt file (.jsonl, .json, .parquet, datasets dir)")
    key = "data.train" if path == data_cfg.train else "data.eval" if path == data_cfg.eval else "prompt file"
    try:
        result = load_records(path, skip_invalid=data_cfg.skip_invalid, field_map=data_cfg.field_map or None,
                              default_domain=data_cfg.default_domain, generate_ids=data_cfg.generate_ids,
                              require_target=require_target)
    except RecordError:  # names file:line and field already
        raise
    except ValueError as exc:  # the file as a whole (not gzip, a FIFO, too large, empty): name the key too
        raise ValueError(f"{key}: {exc}") from None
    if result.skipped:
        log.warning(result.summary())
    return result.records


def prepare_prompts(records: list[PromptRecord], tokenizer, model_cfg: ModelConfig,
                    data_cfg: DataConfig, *, encode=None,
                    limit: PromptLimit | None = None) -> tuple[list[PromptRecord], list[list[int]], dict[str, int]]:
    """Student-view prompt ids for each record, with the overlong policy applied.

    encode(record) -> ids replaces the text rendering (a vision-language student's processor);
    limit: the rollout engine's `prompt_limit` (default: model.max_prompt_tokens).
    """
    from uniopd.models.multimodal import record_images

    kept, ids_out = [], []
    stats = {"truncated": 0, "skipped_overlong": 0}
    limit = limit or PromptLimit.of(model_cfg)
    max_tokens, keys = limit.tokens, limit.keys
    with_images = 0
    for record in records:
        chars, cut = _text_chars(record.prompt), False
        if chars > CHARS_PER_TOKEN * max_tokens:
            if data_cfg.overlong == "error" or (data_cfg.overlong == "truncate" and encode is not None):
                fix = "skip" if encode is not None else "truncate or skip"
                raise PromptTooLong(f"{_where(record)}: prompt has {chars} characters, more than {CHARS_PER_TOKEN} "
                                    f"per token of {keys}: it cannot fit (set data.overlong={fix})")
            if data_cfg.overlong == "skip":
                stats["skipped_overlong"] += 1
                continue
            record = dataclasses.replace(record, prompt=_keep_last_chars(record.prompt, CHARS_PER_TOKEN * max_tokens))
            cut = True
        if encode is not None:
            ids = encode(record)
        else:
            ids = render_prompt(tokenizer, record.prompt, chat_template=model_cfg.chat_template)
            with_images += bool(record_images(record.prompt, record.images))
        if not ids:
            raise ValueError(f"{_where(record)}: the prompt renders to zero tokens")
        if len(ids) > max_tokens:
            if data_cfg.overlong == "truncate" and encode is not None:
                raise PromptTooLong(f"{_where(record)}: prompt has {len(ids)} tokens with its images, more than "
                                    f"{keys}; prompts with images are not truncated "
                                    f"(raise the limit or set data.overlong=skip)")
            if data_cfg.overlong == "error":
                raise PromptTooLong(f"{_where(record)}: prompt has {len(ids)} tokens, more than "
                                    f"{keys} (set data.overlong=truncate or skip)")
            if data_cfg.overlong == "skip":
                stats["skipped_overlong"] += 1
                continue
            ids = ids[-max_tokens:]
            cut = True
        stats["truncated"] += cut
        kept.append(record)
        ids_out.append(ids)
    if stats["truncated"] or stats["skipped_overlong"]:
        log.warning("overlong prompts: %d truncated, %d skipped (%s)", stats["truncated"],
                    stats["skipped_overlong"], keys)
    if with_images:
        log.warning("%d records have images but the model is text-only: it sees their text only", with_images)
    if not kept:
        raise ValueError("no prompts left after applying data.overlong")
    return kept, ids_out, stats
