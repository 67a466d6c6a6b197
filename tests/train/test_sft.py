"""Supervised fine-tuning: the loss is the response tokens' NLL, and training lowers it."""

from __future__ import annotations

import torch

from uniopd.config import ModelConfig, SFTConfig
from uniopd.models.loading import load_model
from uniopd.train.sft import sft_train


def _pairs(tok):
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return [(enc(f"{a}+{b}="), enc(str(a + b)) + [tok.eos_token_id]) for a, b in [(1, 2), (30, 4), (7, 17), (5, 50)]]


def test_first_step_loss_is_the_mean_response_nll(tiny_student_dir):
    loaded = load_model(ModelConfig(path=str(tiny_student_dir), chat_template=False), trainable=True)
    pairs = _pairs(loaded.tokenizer)
    # Reference: a plain full forward per pair, log-softmax, NLL of response tokens only.
    nll = []
    with torch.no_grad():
        for prompt, resp in pairs:
            ids = torch.tensor([prompt + resp])
            logp = torch.log_softmax(loaded.model(input_ids=ids).logits[0].float(), -1)
            for j, tok in enumerate(resp):
                nll.append(-float(logp[len(prompt) - 1 + j, tok]))
    losses = sft_train(loaded, pairs, SFTConfig(steps=1, batch_size=len(pairs), lr=0.0, warmup_steps=1),
                       progress=False)
    # The batch is the shuffled full set, so the mean is over the same tokens.
    assert abs(losses[0] - sum(nll) / len(nll)) < 1e-4


def test_training_memorises_a_tiny_set(tiny_student_dir):
    loaded = load_model(ModelConfig(path=str(tiny_student_dir), chat_template=False), trainable=True)
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    losses = sft_train(loaded, _pairs(loaded.tokenizer),
                       SFTConfig(steps=60, batch_size=4, lr=1e-2, warmup_steps=5), seed=3, progress=False)
    assert losses[-1] < 0.3 * losses[0], losses[::10]
    assert any(not torch.equal(before[n], p) for n, p in loaded.model.named_parameters())
    assert not loaded.model.training  # handed back in eval mode


def test_should_stop_ends_training_at_the_step_it_first_says_so(tiny_student_dir):
    loaded = load_model(ModelConfig(path=str(tiny_student_dir), chat_template=False), trainable=True)
    seen: list[int] = []

    def stop(step: int) -> bool:
        seen.append(step)
        return step == 3

    losses = sft_train(loaded, _pairs(loaded.tokenizer), SFTConfig(steps=10, batch_size=2, lr=1e-3, warmup_steps=1),
                       progress=False, should_stop=stop)
    assert len(losses) == 3 and seen == [1, 2, 3]
    assert not loaded.model.training
