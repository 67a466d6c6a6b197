"""The rollout sampler (inverse CDF, one uniform per row) and the lean decode path."""

from __future__ import annotations

import pytest
import torch

import uniopd.rollout.hf as hf
from uniopd.config import ModelConfig, RolloutConfig
from uniopd.models.forward import build_layout, response_logprobs
from uniopd.models.loading import load_model
from uniopd.rollout.hf import generate, sample_top_p

DRAWS = 40_000
CHI2_DF5_P001 = 20.52  # chi-square critical value, 5 degrees of freedom, p = 0.001
CHI2_DF1_P001 = 10.83


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def _draw(logits_V: torch.Tensor, top_p: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    toks = sample_top_p(logits_V.expand(DRAWS, -1), top_p, g)
    return torch.bincount(toks, minlength=logits_V.shape[0]).double()


@pytest.mark.parametrize("seed", [0, 1])
def test_samples_follow_the_softmax(seed):
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0, 3.0])
    counts = _draw(logits, 1.0, seed)
    assert _chi2(counts, torch.softmax(logits.double(), -1)) < CHI2_DF5_P001


def test_top_p_keeps_the_nucleus_with_its_relative_mass():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    counts = _draw(probs.log(), 0.7, 3)
    assert counts[2:].sum() == 0  # 0.5 + 0.3 reaches 0.7; tokens 2 and 3 are cut
    nucleus = torch.tensor([0.5, 0.3, 0.0, 0.0], dtype=torch.float64) / 0.8
    assert _chi2(counts, nucleus) < CHI2_DF1_P001
    assert int(sample_top_p(probs.log()[None], 0.01, torch.Generator().manual_seed(0))) == 0


def test_zero_probability_tokens_are_never_drawn():
    logits = torch.full((7,), float("-inf"))
    logits[[1, 3, 5]] = torch.tensor([0.0, 1.0, -0.5])  # first and last entries impossible
    counts = _draw(logits, 1.0, 4)
    assert counts[[0, 2, 4, 6]].sum() == 0 and (counts[[1, 3, 5]] > 0).all()


def test_draws_come_from_the_given_generator():
    logits = torch.randn(16, 100, generator=torch.Generator().manual_seed(0))
    a = sample_top_p(logits, 1.0, torch.Generator().manual_seed(7))
    b = sample_top_p(logits, 1.0, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    sample_top_p(logits, 1.0, g)
    c = sample_top_p(logits, 1.0, g)  # the generator's state moved on
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_invalid_probabilities_raise():
    with pytest.raises(RuntimeError, match="cannot sample"):
        sample_top_p(torch.full((2, 5), float("nan")), 1.0, None)


def _load(path):
    return load_model(ModelConfig(path=str(path)), device="cpu")


def test_fast_head_and_plain_model_call_decode_alike(tiny_student_dir, monkeypatch):
    """The decode loop's own head (base model + W @ h^T) gives the model's own samples and log-probs."""
    lm = _load(tiny_student_dir)
    tok = lm.tokenizer
    prompts = [tok("12+3=")["input_ids"], tok("7+45=")["input_ids"]]
    cfg = RolloutConfig(max_new_tokens=8, temperature=0.8, top_p=0.9, batch_size=8)

    def run():
        groups = generate(lm.model, prompts, cfg, n=2, eos_ids={tok.eos_token_id}, pad_id=tok.pad_token_id,
                          generator=torch.Generator().manual_seed(3))
        return [s for g in groups for s in g]

    fast = run()
    monkeypatch.setattr(hf, "_fast_head", lambda model: None)
    plain = run()
    assert [s.response_ids for s in fast] == [s.response_ids for s in plain]
    for a, b in zip(fast, plain):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def test_unpadded_batch_logprobs_match_a_fresh_forward(tiny_student_dir):
    """Prompts of one length decode with no attention mask at all; log-probs still match."""
    lm = _load(tiny_student_dir)
    tok = lm.tokenizer
    prompts = [tok("12+3=")["input_ids"], tok("45+6=")["input_ids"]]
    assert len(prompts[0]) == len(prompts[1])
    cfg = RolloutConfig(max_new_tokens=10, batch_size=8)
    groups = generate(lm.model, prompts, cfg, n=3, eos_ids={tok.eos_token_id}, pad_id=tok.pad_token_id,
                      generator=torch.Generator().manual_seed(1))
    flat = [s for g in groups for s in g]
    layout = build_layout([s.prompt_ids for s in flat], [s.response_ids for s in flat], tok.pad_token_id)
    with torch.no_grad():
        logp_N, _ = response_logprobs(lm.model, layout)
    torch.testing.assert_close(logp_N, torch.tensor([lp for s in flat for lp in s.logprobs]), atol=1e-4, rtol=0)


def test_rollout_threads_apply_while_decoding_only(tiny_student_dir, monkeypatch):
    lm = _load(tiny_student_dir)
    tok = lm.tokenizer
    seen = []
    real = hf.generate_batch
    monkeypatch.setattr(hf, "generate_batch", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = RolloutConfig(max_new_tokens=3, batch_size=8, threads=1)
        generate(lm.model, [tok("1+1=")["input_ids"]], cfg, n=2, eos_ids={tok.eos_token_id}, pad_id=tok.pad_token_id,
                 generator=torch.Generator().manual_seed(0))
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_sampling_across_blocks_follows_the_softmax(monkeypatch):
    # Small blocks so a short vocabulary spans several, one of them partial and one all zero.
    monkeypatch.setattr(hf, "CDF_BLOCK", 4)
    logits = torch.full((14,), float("-inf"))
    logits[[0, 3, 5, 6, 12, 13]] = torch.tensor([1.0, -0.5, 2.0, 0.0, 0.5, -1.0])  # block 2 (8..11) empty
    counts = _draw(logits, 1.0, 5)
    probs = torch.softmax(logits.double(), -1)
    assert counts[probs == 0].sum() == 0
    assert _chi2(counts, probs) < CHI2_DF5_P001


def test_a_vocabulary_of_many_blocks_draws_every_token_it_should():
    # The default block size on a 49k vocabulary: the mass sits on tokens in different blocks.
    logits = torch.full((49_152,), float("-inf"))
    hot = torch.tensor([7, 511, 512, 30_000, 49_151])
    logits[hot] = 0.0
    draws = 2_000  # 2,000 rows of 49k floats: 0.4 GB, not the 8 GB of DRAWS rows
    toks = sample_top_p(logits.expand(draws, -1), 1.0, torch.Generator().manual_seed(6))
    counts = torch.bincount(toks, minlength=logits.shape[0]).double()
    assert counts[hot].sum() == draws
    assert _chi2(counts[hot], torch.full((5,), 0.2, dtype=torch.float64)) < 18.47  # df 4, p = 0.001
