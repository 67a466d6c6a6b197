"""Start-up work shared by train, eval and balance: load prompt records, tokenize prompts.

Prompts longer than `model.max_prompt_tokens` follow `data.overlong`: "error" names the
record, "truncate" keeps the last tokens (the part next to the response), "skip" drops the
record; truncated and skipped records are counted and reported, never silently lost.
Prompts with images (a vision-language student, `encode` given) are never truncated: a
cut could split an image's placeholder tokens; "truncate" is an error for them.
"""

from __future__ import annotations

import logging

from uniopd.config import DataConfig, ModelConfig
from uniopd.data.records import PromptRecord
from uniopd.models.prompts import render_prompt

log = logging.getLogger(__name__)


class PromptTooLong(ValueError):
    pass


def load_prompt_records(data_cfg: DataConfig, path: str | None, *, require_target: bool = True) -> list[PromptRecord]:
    from uniopd.data.loader import load_records

    if not path:
        raise ValueError("data.train is empty: name a prompt file (.jsonl, .json, .parquet, datasets dir)")
    result = load_records(path, skip_invalid=data_cfg.skip_invalid, field_map=data_cfg.field_map or None,
                          default_domain=data_cfg.default_domain, generate_ids=data_cfg.generate_ids,
                          require_target=require_target)
    if result.skipped:
        log.warning(result.summary())
    return result.records


def prepare_prompts(records: list[PromptRecord], tokenizer, model_cfg: ModelConfig,
                    data_cfg: DataConfig, *, encode=None) -> tuple[list[PromptRecord], list[list[int]], dict[str, int]]:
    """Student-view prompt ids for each record, with the overlong policy applied.

    encode(record) -> ids replaces the text rendering (a vision-language student's processor).
    """
    from uniopd.models.multimodal import record_images

    kept, ids_out = [], []
    stats = {"truncated": 0, "skipped_overlong": 0}
    limit = model_cfg.max_prompt_tokens
    with_images = 0
    for record in records:
        if encode is not None:
            ids = encode(record)
        else:
            ids = render_prompt(tokenizer, record.prompt, chat_template=model_cfg.chat_template)
            with_images += bool(record_images(record.prompt, record.images))
        if not ids:
            raise ValueError(f"record {record.id!r}: the prompt renders to zero tokens")
        if len(ids) > limit:
            if data_cfg.overlong == "truncate" and encode is not None:
                raise PromptTooLong(f"record {record.id!r}: prompt has {len(ids)} tokens with its images, more than "
                                    f"model.max_prompt_tokens={limit}; prompts with images are not truncated "
                                    f"(raise the limit or set data.overlong=skip)")
            if data_cfg.overlong == "error":
                raise PromptTooLong(f"record {record.id!r}: prompt has {len(ids)} tokens, more than "
                                    f"model.max_prompt_tokens={limit} (set data.overlong=truncate or skip)")
            if data_cfg.overlong == "skip":
                stats["skipped_overlong"] += 1
                continue
            ids = ids[-limit:]
            stats["truncated"] += 1
        kept.append(record)
        ids_out.append(ids)
    if stats["truncated"] or stats["skipped_overlong"]:
        log.warning("overlong prompts: %d truncated, %d skipped (model.max_prompt_tokens=%d)",
                    stats["truncated"], stats["skipped_overlong"], limit)
    if with_images:
        log.warning("%d records have images but the model is text-only: it sees their text only", with_images)
    if not kept:
        raise ValueError("no prompts left after applying data.overlong")
    return kept, ids_out, stats
