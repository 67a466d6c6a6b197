"""The vLLM engine's room for a prompt, without vLLM: min(model.max_prompt_tokens,
max_model_len - rollout.max_new_tokens), handed to `prepare_prompts` so `data.overlong` handles
prompts the engine could not take; a max_model_len with no room is refused at start-up."""

from __future__ import annotations

import pytest

from uniopd.config import ConfigError, RolloutConfig, load_config
from uniopd.data.prompts import PromptTooLong, prepare_prompts
from uniopd.data.records import PromptRecord
from uniopd.demo.tokenizer import char_tokenizer
from uniopd.rollout.base import checked_engine_class
from uniopd.rollout.vllm import vllm_prompt_limit


def test_limit_is_the_smaller_of_the_two_and_names_its_keys():
    assert vllm_prompt_limit(100, 512, 64).tokens == 100
    assert vllm_prompt_limit(100, 512, 64).keys == "model.max_prompt_tokens=100"
    limit = vllm_prompt_limit(1024, 512, 64, configured_len=512)
    assert limit.tokens == 448
    assert "rollout.vllm_max_model_len=512" in limit.keys and "rollout.max_new_tokens=64" in limit.keys
    assert "model.max_prompt_tokens=1024" in limit.keys
    # Not configured: the model's own length, and the key that would set it.
    assert "vLLM's max_model_len 128" in vllm_prompt_limit(1024, 128, 8).keys
    assert vllm_prompt_limit(1024, 128, 127).tokens == 1


@pytest.mark.parametrize("max_new", [64, 100])
def test_no_room_for_a_prompt_is_refused_naming_both_keys(max_new):
    with pytest.raises(ConfigError, match=f"rollout.vllm_max_model_len=64 leaves no room for a prompt after "
                                          f"rollout.max_new_tokens={max_new}"):
        vllm_prompt_limit(1024, 64, max_new, configured_len=64)
    # Before any model loads (vLLM need not be installed for this refusal).
    with pytest.raises(ConfigError, match="rollout.vllm_max_model_len=64 leaves no room"):
        checked_engine_class(RolloutConfig(backend="vllm", max_new_tokens=max_new, vllm_max_model_len=64))


def _records():
    return [PromptRecord(id="short", domain="d", prompt="1+1=", answer="2"),
            PromptRecord(id="long", domain="d", prompt="9" * 30 + "+1=", answer="1")]


@pytest.mark.parametrize("policy", ["error", "truncate", "skip"])
def test_prompts_over_the_engine_room_follow_data_overlong(policy):
    cfg = load_config(None, ["model.max_prompt_tokens=1024", f"data.overlong={policy}"])
    limit = vllm_prompt_limit(cfg.model.max_prompt_tokens, 40, 20, configured_len=40)  # 20 tokens of room
    tok = char_tokenizer()
    if policy == "error":
        with pytest.raises(PromptTooLong, match=r"record 'long': prompt has 33 tokens, more than the 20 tokens the "
                                                r"vLLM engine has for a prompt \(rollout.vllm_max_model_len=40 - "
                                                r"rollout.max_new_tokens=20; model.max_prompt_tokens=1024\)"):
            prepare_prompts(_records(), tok, cfg.model, cfg.data, limit=limit)
        return
    kept, ids, stats = prepare_prompts(_records(), tok, cfg.model, cfg.data, limit=limit)
    if policy == "truncate":
        assert [r.id for r in kept] == ["short", "long"] and stats == {"truncated": 1, "skipped_overlong": 0}
        assert len(ids[1]) == 20 and tok.decode(ids[1]).endswith("+1=")
    else:
        assert [r.id for r in kept] == ["short"] and stats == {"truncated": 0, "skipped_overlong": 1}
