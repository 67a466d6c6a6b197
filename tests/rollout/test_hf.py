import pytest
import torch

from uniopd.config import RolloutConfig
from uniopd.models.forward import build_layout, response_logprobs
from uniopd.models.loading import load_model
from uniopd.config import ModelConfig
from uniopd.rollout.hf import generate, sample_top_p


def _load(path):
    return load_model(ModelConfig(path=str(path)), device="cpu")


def test_rollout_logprobs_match_a_fresh_forward(tiny_student_dir):
    """The rollout's per-token log-probs are the PPO old log-probs: they must equal a full forward."""
    lm = _load(tiny_student_dir)
    tok = lm.tokenizer
    prompts = [tok("12+3=")["input_ids"], tok("7+45=")["input_ids"], tok("1=")["input_ids"]]
    cfg = RolloutConfig(max_new_tokens=8, temperature=0.7, batch_size=8)
    groups = generate(lm.model, prompts, cfg, n=3, eos_ids={tok.eos_token_id}, pad_id=tok.pad_token_id,
                      generator=torch.Generator().manual_seed(0))
    assert [len(g) for g in groups] == [3, 3, 3]
    flat = [s for g in groups for s in g]
    layout = build_layout([s.prompt_ids for s in flat], [s.response_ids for s in flat], tok.pad_token_id)
    with torch.no_grad():
        logp_N, _ = response_logprobs(lm.model, layout, temperature=0.7)
    rollout_N = torch.tensor([lp for s in flat for lp in s.logprobs])
    assert torch.allclose(logp_N, rollout_N, atol=1e-4)


def test_rollout_stops_at_eos_and_respects_limits(tiny_student_dir):
    lm = _load(tiny_student_dir)
    tok = lm.tokenizer
    # Make EOS overwhelmingly likely: bias the output head towards it.
    with torch.no_grad():
        lm.model.lm_head.weight[tok.eos_token_id] += 5.0 * lm.model.model.norm.weight.sign()
    prompts = [tok("1+1=")["input_ids"]]
    cfg = RolloutConfig(max_new_tokens=5, batch_size=4)
    groups = generate(lm.model, prompts, cfg, n=4, eos_ids={tok.eos_token_id}, pad_id=tok.pad_token_id,
                      generator=torch.Generator().manual_seed(0))
    for s in groups[0]:
        assert len(s.response_ids) <= 5
        if s.finished:
            assert s.response_ids[-1] == tok.eos_token_id
            assert tok.eos_token_id not in s.response_ids[:-1]
    cfg_min = RolloutConfig(max_new_tokens=5, min_new_tokens=5, batch_size=4)
    groups = generate(lm.model, prompts, cfg_min, n=4, eos_ids={tok.eos_token_id}, pad_id=tok.pad_token_id,
                      generator=torch.Generator().manual_seed(0))
    assert all(len(s.response_ids) == 5 for s in groups[0])


def test_rollout_is_deterministic_for_a_generator_seed(tiny_student_dir):
    lm = _load(tiny_student_dir)
    tok = lm.tokenizer
    prompts = [tok("3+4=")["input_ids"], tok("10+20=")["input_ids"]]
    cfg = RolloutConfig(max_new_tokens=6, batch_size=3)
    run = lambda: [s.response_ids for g in generate(lm.model, prompts, cfg, n=2, eos_ids={tok.eos_token_id},  # noqa
                                                    pad_id=tok.pad_token_id,
                                                    generator=torch.Generator().manual_seed(5)) for s in g]
    assert run() == run()


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_top_p(logits, 0.7, g)) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7; tokens 2 and 3 are cut
    assert int(sample_top_p(logits, 0.01, g)) == 0


def test_the_engine_takes_prompts_that_fit_the_students_positions_with_the_response(tiny_student_dir):
    from uniopd.config import ConfigError
    from uniopd.rollout.hf import HFEngine

    lm = _load(tiny_student_dir)  # max_position_embeddings=128
    assert HFEngine(RolloutConfig(max_new_tokens=8), lm).prompt_limit(64).keys == "model.max_prompt_tokens=64"
    limit = HFEngine(RolloutConfig(max_new_tokens=100), lm).prompt_limit(1024)
    assert limit.tokens == 28
    assert limit.keys == ("the 28 tokens the hf engine has for a prompt (the student's max_position_embeddings=128 "
                          "- rollout.max_new_tokens=100; model.max_prompt_tokens=1024)")
    with pytest.raises(ConfigError, match=r"the student's max_position_embeddings=128 leaves no room for a prompt "
                                          r"after rollout.max_new_tokens=128"):
        HFEngine(RolloutConfig(max_new_tokens=128), lm)
