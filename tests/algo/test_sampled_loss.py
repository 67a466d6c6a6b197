import math

import pytest
import torch

from uniopd.algo.advantages import outcome_advantages, reverse_kl_advantages
from uniopd.algo.losses.sampled import ppo_clip_loss


def test_reverse_kl_advantage_hand_values():
    s = torch.tensor([[-1.0, -2.0, -0.5]])
    t = torch.tensor([[-0.5, -3.0, -9.0]])
    mask = torch.tensor([[True, True, False]])
    adv = reverse_kl_advantages(s, t, mask, kl_coef=2.0)
    assert torch.allclose(adv, torch.tensor([[1.0, -2.0, 0.0]]))
    assert not adv.requires_grad


def test_outcome_advantage_group_baseline():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    g = torch.tensor([0, 0, 0, 1, 1])
    out = outcome_advantages(r, g, baseline="group")
    assert torch.allclose(out, torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0]))
    assert torch.equal(outcome_advantages(r, g, baseline="none"), r)


def test_ppo_loss_hand_computed_with_clipping():
    # ratios e^{0}=1, e^{0.5}=1.6487 (clipped to 1.28 for A>0), e^{-0.5}=0.6065 (clipped to 0.8 for A<0)
    old = torch.zeros(1, 4)
    logp = torch.tensor([[0.0, 0.5, -0.5, 0.3]], requires_grad=True)
    adv = torch.tensor([[1.0, 2.0, -1.0, 5.0]])
    mask = torch.tensor([[True, True, True, False]])
    loss, stats = ppo_clip_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    # token 0: -1*1 = -1; token 1: max(-2*1.6487, -2*1.28) = -2.56; token 2: max(1*0.6065, 1*0.8) = 0.8
    expected = (-1.0 - 2.56 + 0.8) / 3
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)
    assert math.isclose(float(stats["clip_frac"]), 2 / 3, rel_tol=1e-6)
    loss.backward()
    # Clipped tokens get no gradient; token 0: d/dlogp(-A*e^logp)/3 = -1/3; masked token 3: 0
    assert torch.allclose(logp.grad, torch.tensor([[-1 / 3, 0.0, 0.0, 0.0]]), atol=1e-6)


def test_ppo_loss_normalizer_makes_micro_batches_add_up():
    torch.manual_seed(0)
    logp = torch.randn(6, 5, requires_grad=True)
    old = logp.detach() + 0.1 * torch.randn(6, 5)
    adv = torch.randn(6, 5)
    mask = torch.rand(6, 5) > 0.3
    full, _ = ppo_clip_loss(logp, old, adv, mask)
    n = float(mask.sum())
    a, _ = ppo_clip_loss(logp[:2], old[:2], adv[:2], mask[:2], normalizer=n)
    b, _ = ppo_clip_loss(logp[2:], old[2:], adv[2:], mask[2:], normalizer=n)
    assert torch.allclose(full, a + b, atol=1e-6)


def test_ppo_loss_empty_mask_is_zero_not_nan():
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, _ = ppo_clip_loss(logp, logp.detach(), torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()


def test_seq_mean_token_mean_is_each_responses_mean_then_the_mean_over_responses():
    # At ratio 1 the PPO loss of a token is -A. Two responses: lengths 2 and 4 (one token
    # of the second clipped away by the mask, still counted in its length, as the release does).
    adv = torch.tensor([[1.0, 3.0, 0.0, 0.0], [2.0, 2.0, 6.0, 100.0]])
    mask = torch.tensor([[True, True, False, False], [True, True, True, False]])
    lengths = torch.tensor([[2.0], [4.0]]).expand(2, 4)
    logp = torch.zeros(2, 4)
    loss, _ = ppo_clip_loss(logp, logp, adv, mask, normalizer=2, token_weight=1.0 / lengths)
    want = -((1 + 3) / 2 + (2 + 2 + 6) / 4) / 2
    assert loss.item() == pytest.approx(want)
    token_mean, _ = ppo_clip_loss(logp, logp, adv, mask)
    assert token_mean.item() == pytest.approx(-(1 + 3 + 2 + 2 + 6) / 5)
