"""chunked_token_logprobs: the hand-written backward equals autograd, kept or recomputed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from uniopd.algo.losses.chunked import chunked_token_logprobs

N, H, V = 23, 8, 17


def _inputs(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g, dtype=dtype) * 2).requires_grad_()
    head = torch.randn(V, H, generator=g, dtype=dtype).requires_grad_()
    ids = torch.randint(0, V, (N,), generator=g)
    weights = torch.randn(N, generator=g, dtype=dtype)
    return hidden, head, ids, weights


def _ref_logp(hidden, head, ids, temperature):
    logits = F.linear(hidden, head)
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return F.log_softmax(logits / temperature, -1)[torch.arange(len(ids)), ids]


# keep_bytes: 0 recomputes every chunk in the backward, None (256 MiB) keeps them all, and
# 5 * V * 8 bytes keeps the first chunk of 5 float64 rows only.
@pytest.mark.parametrize("keep_bytes", [0, None, 5 * V * 8])
@pytest.mark.parametrize("chunk_size", [1, 5, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_grads_equal_autograd(keep_bytes, chunk_size, temperature):
    hidden, head, ids, w = _inputs()
    ours = chunked_token_logprobs(hidden, head, ids, chunk_size=chunk_size, temperature=temperature,
                                  keep_bytes=keep_bytes)
    ref = _ref_logp(hidden, head, ids, temperature)
    torch.testing.assert_close(ours, ref)
    grads = torch.autograd.grad((ours * w).sum(), (hidden, head))
    ref_grads = torch.autograd.grad((ref * w).sum(), (hidden, head))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_kept_and_recomputed_paths_agree_in_float32():
    hidden, head, ids, w = _inputs(torch.float32)
    results = []
    for keep_bytes in (0, None):
        hidden.grad = head.grad = None
        logp = chunked_token_logprobs(hidden, head, ids, chunk_size=4, keep_bytes=keep_bytes)
        (logp * w).sum().backward()
        results.append((logp.detach(), hidden.grad.clone(), head.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # same arithmetic, same order


def test_only_the_grads_asked_for_and_a_retained_graph():
    hidden, head, ids, w = _inputs()
    head_frozen = head.detach()
    logp = chunked_token_logprobs(hidden, head_frozen, ids, chunk_size=7)
    (g_hidden,) = torch.autograd.grad((logp * w).sum(), (hidden,))
    ref = _ref_logp(hidden, head_frozen, ids, 1.0)
    torch.testing.assert_close(g_hidden, torch.autograd.grad((ref * w).sum(), (hidden,))[0])
    # A second backward through the same graph recomputes the consumed softmax.
    logp = chunked_token_logprobs(hidden, head, ids, chunk_size=7)
    loss = (logp * w).sum()
    first = torch.autograd.grad(loss, (hidden, head), retain_graph=True)
    second = torch.autograd.grad(loss, (hidden, head))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)


def test_bfloat16_inputs_give_float32_logprobs():
    hidden, head, ids, w = _inputs(torch.float32)
    hb, wb = hidden.detach().bfloat16().requires_grad_(), head.detach().bfloat16().requires_grad_()
    logp = chunked_token_logprobs(hb, wb, ids, chunk_size=6)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, _ref_logp(hb, wb, ids, 1.0))
    (logp * w).sum().backward()
    assert hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    ref_h, ref_w = torch.autograd.grad((_ref_logp(hb, wb, ids, 1.0) * w).sum(), (hb, wb))
    torch.testing.assert_close(hb.grad.float(), ref_h.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(wb.grad.float(), ref_w.float(), rtol=2e-2, atol=2e-2)


def test_no_grad_path_matches():
    hidden, head, ids, _ = _inputs()
    with torch.inference_mode():
        ours = chunked_token_logprobs(hidden, head, ids, chunk_size=5)
    torch.testing.assert_close(ours, _ref_logp(hidden, head, ids, 1.0).detach())


@pytest.mark.parametrize("keep_bytes", [0, None])
def test_a_trainable_cpu_head_is_packed_once_per_call_and_gives_the_same_values(keep_bytes, monkeypatch):
    import uniopd.algo.losses.chunked as chunked
    from uniopd.cpu.packed import can_pack

    g = torch.Generator().manual_seed(1)
    n = chunked.PACK_HEAD_MIN_ROWS + 32  # three chunks of 64: one pack serves them all
    hidden = torch.randn(n, 16, generator=g).requires_grad_()
    head = torch.randn(300, 16, generator=g).requires_grad_()
    ids = torch.randint(0, 300, (n,), generator=g)
    w = torch.randn(n, generator=g)
    packs, real_pack = [], chunked.pack
    monkeypatch.setattr(chunked, "pack", lambda t: packs.append(t) or real_pack(t))
    ours = chunked_token_logprobs(hidden, head, ids, chunk_size=64, keep_bytes=keep_bytes)
    grads = torch.autograd.grad((ours * w).sum(), (hidden, head))
    assert len(packs) == (1 if can_pack(head) else 0)
    ref = _ref_logp(hidden, head, ids, 1.0)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    for got, want in zip(grads, torch.autograd.grad((ref * w).sum(), (hidden, head))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
