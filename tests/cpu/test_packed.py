"""Linear layers on packed weights compute what F.linear computes, and never go stale."""

import pytest
import torch
import torch.nn.functional as F

from uniopd.cpu import packed
from uniopd.cpu.packed import can_pack, linear, packed_linears, packed_weight

pytestmark = pytest.mark.skipif(not can_pack(torch.zeros(2, 2)), reason="this torch has no oneDNN linear ops")


def _frozen(n=48, k=32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(k, n).requires_grad_(False)


def test_a_frozen_weight_is_packed_once_and_matches_f_linear():
    lin = _frozen()
    x = torch.randn(3, 5, 32)
    with torch.inference_mode():
        assert packed_weight(lin.weight) is packed_weight(lin.weight)
        torch.testing.assert_close(linear(x, lin.weight, lin.bias), F.linear(x, lin.weight, lin.bias),
                                   atol=1e-5, rtol=1e-5)


def test_an_in_place_write_to_a_frozen_weight_repacks_it():
    lin = _frozen()
    x = torch.randn(4, 32)
    first = packed_weight(lin.weight)
    with torch.no_grad():
        lin.weight.copy_(torch.randn_like(lin.weight))
    assert packed_weight(lin.weight) is not first
    torch.testing.assert_close(linear(x, lin.weight, lin.bias), F.linear(x, lin.weight, lin.bias),
                               atol=1e-5, rtol=1e-5)


def test_trainable_weights_are_never_cached_and_keep_their_gradient():
    lin = torch.nn.Linear(32, 48)
    assert packed_weight(lin.weight) is None
    x = torch.randn(4, 32, requires_grad=True)
    linear(x, lin.weight, lin.bias).square().sum().backward()
    assert x.grad is not None and lin.weight.grad is not None
    assert not any(ref() is lin.weight for ref, _, _ in packed._FROZEN.values())


def test_a_slice_of_a_frozen_head_is_cached_per_slice():
    head = torch.randn(100, 32)  # requires_grad False: frozen
    assert packed_weight(head[:90]) is packed_weight(head[:90])
    h = torch.randn(6, 32)
    torch.testing.assert_close(linear(h, head[:90]), h @ head[:90].T, atol=1e-5, rtol=1e-5)


def test_packed_linears_swaps_forward_only_inside_the_block():
    model = torch.nn.Sequential(_frozen(48, 32), torch.nn.ReLU(), _frozen(16, 48, seed=1))
    x = torch.randn(7, 32)
    want = model(x)
    keys = list(model.state_dict())
    with packed_linears(model) as n:
        assert n == 2 and "forward" in vars(model[0])
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
    assert "forward" not in vars(model[0]) and type(model[0]) is torch.nn.Linear
    assert list(model.state_dict()) == keys
    trainable = torch.nn.Sequential(torch.nn.Linear(32, 8))
    with packed_linears(trainable) as n:
        assert n == 0
