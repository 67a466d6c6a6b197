"""Prompts longer than model.max_prompt_tokens: error, truncate or skip, always counted."""

import pytest

from uniopd.config import load_config
from uniopd.data.records import PromptRecord
from uniopd.demo.tokenizer import char_tokenizer
from uniopd.data.prompts import PromptTooLong, prepare_prompts


def _records():
    return [PromptRecord(id="short", domain="d", prompt="1+1=", answer="2"),
            PromptRecord(id="long", domain="d", prompt="9" * 50 + "+1=", answer="1")]


@pytest.mark.parametrize("policy", ["error", "truncate", "skip"])
def test_overlong_policy(policy):
    cfg = load_config(None, ["model.max_prompt_tokens=10", f"data.overlong={policy}"])
    tok = char_tokenizer()
    if policy == "error":
        with pytest.raises(PromptTooLong, match="record 'long': prompt has 53 tokens"):
            prepare_prompts(_records(), tok, cfg.model, cfg.data)
        return
    kept, ids, stats = prepare_prompts(_records(), tok, cfg.model, cfg.data)
    if policy == "truncate":
        assert [r.id for r in kept] == ["short", "long"] and stats == {"truncated": 1, "skipped_overlong": 0}
        assert tok.decode(ids[1]).endswith("+1=") and len(ids[1]) == 10
    else:
        assert [r.id for r in kept] == ["short"] and stats == {"truncated": 0, "skipped_overlong": 1}
