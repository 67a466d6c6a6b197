"""A lean single-token decode step for Llama-family text models (Llama, Mistral, Qwen2, Qwen3).

Per layer, for the new token x [B, H] (left-padded rows masked out of attention):

    h = RMSNorm(x);  q, k, v = W_qkv h (+ b);  q, k = RoPE(q, k)  [Qwen3: RMSNorm per head first]
    x = x + W_o softmax(q K^T * scale + mask) V          (K, V: a preallocated [B, kv, L, d] cache)
    x = x + W_down (silu(W_gate h') * W_up h'),  h' = RMSNorm(x)

the same computation as the model's own forward, on its own weights and rotary module,
so the tokens and log-probs agree with it to float rounding (tests/rollout/test_lean.py).
What differs is the cost (issue 7's decode profile at B = 8 on CPU): on CPU in fp32 every
weight (body and output head) is packed once per `generate_batch` call for oneDNN
(`uniopd.models.packed`: MKL's GEMM with 8 rows read weights at 4 to 7 GB/s of the 20 to
24 a plain read gets), 1.5 to 1.8x faster per step than the model's forward measured side
by side (`benchmarks/decode_step.py`), at the price of a second copy of the student's
weights while decoding. That copy stacks q/k/v and gate/up into one matrix each, so a
layer makes four oneDNN calls instead of seven. Elsewhere (GPU, bf16) each projection is
(W @ h^T)^T on the model's own weight. Attention is two 3-D batched matmuls over grouped
query heads instead of a fused kernel that was slower for one query, and the key/value
cache is written in place rather than concatenated each step. Prefill still runs through
the model (its masks, attention kernel and multimodal inputs); this module takes over from
the filled cache. Anything it does not recognise (other model types, sliding windows, other
activations) leaves decoding to the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from uniopd.models.packed import can_pack, pack, thin_linear

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")
PACK_MIN_STEPS = 8  # packing costs about as much as two decode steps: not worth it for a few tokens


def _rms(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    if x.dtype == torch.float32:  # one op, the same values (20 vs 30 us at B = 8)
        return F.rms_norm(x, x.shape[-1:], norm.weight, norm.variance_epsilon)
    # As the HF RMSNorms of these families: statistics in fp32, weight applied in the input dtype.
    xf = x.float()
    return norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)).to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    # x*cos + rotate_half(x)*sin, with rotate_half(x) = (-x2, x1) written as roll(x) = (x2, x1)
    # times a sin whose first half is negated: the same products, two ops fewer per call.
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin_signed)


class _Proj:
    """A decode step's projection: x W^T + b, W possibly several of a layer's linears stacked
    (q/k/v, gate/up: one oneDNN call instead of three or two) and packed for oneDNN."""

    def __init__(self, lins: list[nn.Linear], rows: int | None):
        if len(lins) == 1:
            self.w, self.b = lins[0].weight, lins[0].bias
        else:
            self.w = torch.cat([lin.weight.detach() for lin in lins])
            biases = [lin.bias for lin in lins]
            self.b = None if all(b is None for b in biases) else torch.cat(
                [b.detach() if b is not None else lin.weight.new_zeros(lin.out_features)
                 for b, lin in zip(biases, lins)])
        self.packed = pack(self.w, rows) if rows else None

    def __call__(self, x_BK: torch.Tensor) -> torch.Tensor:
        return thin_linear(x_BK, self.w, self.b, packed=self.packed)


def unsupported_reason(model: nn.Module) -> str | None:
    """Why `LeanDecoder` cannot decode this model, or None when it can."""
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in SUPPORTED_TYPES:
        return f"model_type {mtype!r} is not one of {SUPPORTED_TYPES}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r}"
    if getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True):
        return "sliding-window attention"
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or ())):
        return "layers other than full attention"
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None or not hasattr(base, "rotary_emb") or not hasattr(base, "norm"):
        return "no model.layers / rotary_emb / norm"
    for lay in layers:
        a, m = lay.self_attn, lay.mlp
        if not all(hasattr(a, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")) or \
                not all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj")):
            return "a layer without the Llama attention/MLP projections"
    return None


class LeanDecoder:
    """Decodes one token per call from a prefilled `DynamicCache` (see the module docstring).

    keep_BL: which of the L0 prompt positions each row may attend to (None: all); the
    T new positions are always visible.
    """

    def __init__(self, model: nn.Module, cache, keep_BL: torch.Tensor | None, max_new: int,
                 head_VH: torch.Tensor | None = None):
        self.base = model.model
        self.head_VH = head_VH
        cfg = model.config
        self.nh, self.nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.nh
        self.k_cache, self.v_cache = [], []
        for i in range(len(self.base.layers)):
            k0, v0 = cache.layers[i].keys, cache.layers[i].values  # [B, kv, L0, d]
            B, _, L0, _ = k0.shape
            k = k0.new_empty(B, self.nkv, L0 + max_new, self.hd)
            v = torch.empty_like(k)
            k[:, :, :L0], v[:, :, :L0] = k0, v0
            self.k_cache.append(k)
            self.v_cache.append(v)
        self.length = L0
        self.bias_B11L = None
        if keep_BL is not None and not bool(keep_BL.all()):
            bias_BL = torch.zeros((B, L0 + max_new), dtype=k0.dtype, device=k0.device)
            bias_BL[:, :L0].masked_fill_(~keep_BL.bool(), float("-inf"))
            self.bias_B11L = bias_BL[:, None, None, :]
        # On CPU fp32 every weight is packed once for this batch (a copy), so q/k/v and
        # gate/up are stacked into that copy for free; elsewhere each linear keeps its own weight.
        rows = B if max_new >= PACK_MIN_STEPS and can_pack(self.base.layers[0].mlp.down_proj.weight) else None
        self.proj = []
        for lay in self.base.layers:
            a, m = lay.self_attn, lay.mlp
            qkv = [[a.q_proj, a.k_proj, a.v_proj]] if rows else [[a.q_proj], [a.k_proj], [a.v_proj]]
            gate_up = [[m.gate_proj, m.up_proj]] if rows else [[m.gate_proj], [m.up_proj]]
            self.proj.append({"qkv": [_Proj(lins, rows) for lins in qkv], "o": _Proj([a.o_proj], rows),
                              "gate_up": [_Proj(lins, rows) for lins in gate_up], "down": _Proj([m.down_proj], rows)})
        self.head_packed = pack(head_VH, rows) if rows and head_VH is not None else None

    def head(self, hidden_BH: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] of the output head given at construction."""
        return thin_linear(hidden_BH, self.head_VH, packed=self.head_packed).contiguous()

    def step(self, tok_B: torch.Tensor, pos_B: torch.Tensor) -> torch.Tensor:
        """The final-norm hidden state [B, H] after feeding tok_B at positions pos_B."""
        B, nh, nkv, hd = tok_B.shape[0], self.nh, self.nkv, self.hd
        L = self.length + 1
        x_BH = self.base.embed_tokens(tok_B)
        cos, sin = self.base.rotary_emb(x_BH, pos_B[:, None])  # [B, 1, d]
        sin = torch.cat((-sin[..., : hd // 2], sin[..., hd // 2:]), -1)
        bias = None if self.bias_B11L is None else self.bias_B11L[..., :L]
        for lay, proj, k_cache, v_cache in zip(self.base.layers, self.proj, self.k_cache, self.v_cache):
            a = lay.self_attn
            h_BH = _rms(x_BH, lay.input_layernorm)
            qkv = [p(h_BH) for p in proj["qkv"]]
            q, k, v = qkv[0].split((nh * hd, nkv * hd, nkv * hd), -1) if len(qkv) == 1 else qkv
            q, k = q.view(B, nh, hd), k.view(B, nkv, hd)
            if hasattr(a, "q_norm"):  # Qwen3
                q, k = _rms(q, a.q_norm), _rms(k, a.k_norm)
            k_cache[:, :, L - 1] = _rope(k, cos, sin)
            v_cache[:, :, L - 1] = v.view(B, nkv, hd)
            # Query heads grouped under their shared key/value head (as repeat_kv lays them out),
            # one bmm over the B*kv groups: 3-D bmm took 78 us where 4-D matmul took 131 (B = 8).
            q_NGD = _rope(q, cos, sin).reshape(B * nkv, nh // nkv, hd)
            s_NGL = torch.bmm(q_NGD, k_cache.view(B * nkv, -1, hd)[:, :L].transpose(1, 2)).mul_(a.scaling)
            if bias is not None:
                s_NGL.view(B, nkv, -1, L).add_(bias)
            p_NGL = torch.softmax(s_NGL, dim=-1, dtype=torch.float32).to(q.dtype)
            o_BH = torch.bmm(p_NGL, v_cache.view(B * nkv, -1, hd)[:, :L]).view(B, nh * hd)
            x_BH = x_BH + proj["o"](o_BH)
            h_BH = _rms(x_BH, lay.post_attention_layernorm)
            gate_up = [p(h_BH) for p in proj["gate_up"]]
            g, u = gate_up[0].chunk(2, -1) if len(gate_up) == 1 else gate_up
            x_BH = x_BH + proj["down"](F.silu(g) * u)
        self.length = L
        return _rms(x_BH, self.base.norm)
