"""A lean single-token decode step for Llama-family text models (Llama, Mistral, Qwen2, Qwen3).

Per layer, for the new token x [B, H] (left-padded rows masked out of attention):

    h = RMSNorm(x);  q, k, v = W_qkv h (+ b);  q, k = RoPE(q, k)  [Qwen3: RMSNorm per head first]
    x = x + W_o softmax(q K^T * scale + mask) V          (K, V: a preallocated [B, kv, L, d] cache)
    x = x + W_down (silu(W_gate h') * W_up h'),  h' = RMSNorm(x)

the same computation as the model's own forward, on its own weights and rotary module,
so the tokens and log-probs agree with it to float rounding (tests/rollout/test_lean.py).
What differs is the cost (the decode profile at B = 8 on CPU): on CPU in fp32 every
weight (body and output head) is packed once per `generate_batch` call for oneDNN
(`uniopd.cpu.packed`: MKL's GEMM with 8 rows read weights at 4 to 7 GB/s of the 20 to
24 a plain read gets), 1.5 to 1.8x faster per step than the model's forward measured side
by side (`benchmarks/decode_step.py`), at the price of a second copy of the student's
weights while decoding. That copy stacks q/k/v and gate/up into one matrix each, so a
layer makes four oneDNN calls instead of seven, and has the RMSNorm weights before them
folded in ((x^ * g) W^T = x^ (W g)^T); oneDNN adds the residual stream as it writes W_o's
and W_down's outputs. Elsewhere (GPU, bf16) each projection is (W @ h^T)^T on the model's
own weight. The step's small ops cost far more than they would alone: every weight read
evicts the caches, so the op after a GEMM starts cold (ops of 3 to 16 us took 55 to 236 us
right after streaming 120 MB; benchmarks/README.md). So the step keeps them few:
RoPE is one pass over q and k together, with cos/sin looked up from a table built once per
batch and the attention scale folded into q's rows of it; attention is two 3-D batched
matmuls over grouped query heads (a fused kernel was slower for one query); the key/value
cache is written in place rather than concatenated each step. Prefill still runs through
the model (its masks, attention kernel and multimodal inputs); this module takes over from
the filled cache. Anything it does not recognise (other model types, sliding windows, other
activations) leaves decoding to the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from uniopd.cpu.packed import can_pack, pack, packed_linear, thin_linear
from uniopd.models.families import full_attention_llama_reason

PACK_MIN_STEPS = 8  # packing costs about as much as two decode steps: not worth it for a few tokens
_POSITION_DEPENDENT_ROPE = ("dynamic", "longrope")  # their cos/sin change with the longest position seen


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


def unsupported_reason(model: nn.Module) -> str | None:
    """Why `LeanDecoder` cannot decode this model, or None when it can."""
    cfg = getattr(model, "config", None)
    reason = full_attention_llama_reason(cfg)
    if reason is not None:
        return reason
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r}"
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None or not hasattr(base, "rotary_emb") or not hasattr(base, "norm"):
        return "no model.layers / rotary_emb / norm"
    if len({getattr(lay.self_attn, "scaling", None) for lay in layers}) != 1:
        return "layers with different attention scales"  # one per step is folded into q's RoPE table
    for lay in layers:
        a, m = lay.self_attn, lay.mlp
        if not all(hasattr(a, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")) or \
                not all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj")):
            return "a layer without the Llama attention/MLP projections"
    return None


def _stack(lins: list[nn.Linear], norm_w: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The linears' weights stacked, times the RMSNorm weight before them (x^ * g) W^T = x^ (W g)^T,
    packed for oneDNN; their biases stacked (None if none has one)."""
    w = torch.cat([lin.weight.detach() for lin in lins]) * norm_w.detach()
    biases = [lin.bias for lin in lins]
    b = None if all(b is None for b in biases) else torch.cat(
        [b.detach() if b is not None else lin.weight.new_zeros(lin.out_features) for b, lin in zip(biases, lins)])
    return pack(w, rows), b


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
        # On CPU fp32 every weight is packed once for this batch (a copy): q/k/v and gate/up are
        # stacked into it and the RMSNorm weights before them folded in, for free. Elsewhere the
        # step runs on the model's own weights.
        rows = B if max_new >= PACK_MIN_STEPS and can_pack(self.base.layers[0].mlp.down_proj.weight) else None
        self.packed_layers = None
        self.head_packed = None
        if rows:
            self.packed_layers = []
            for lay in self.base.layers:
                a, m = lay.self_attn, lay.mlp
                self.packed_layers.append((
                    *_stack([a.q_proj, a.k_proj, a.v_proj], lay.input_layernorm.weight, rows),
                    pack(a.o_proj.weight, rows), a.o_proj.bias,
                    *_stack([m.gate_proj, m.up_proj], lay.post_attention_layernorm.weight, rows),
                    pack(m.down_proj.weight, rows), m.down_proj.bias,
                    lay.input_layernorm.variance_epsilon, lay.post_attention_layernorm.variance_epsilon,
                    getattr(a, "q_norm", None), getattr(a, "k_norm", None)))
            if head_VH is not None:
                self.head_packed = pack(head_VH * self.base.norm.weight.detach(), rows)
        # q rows first, then k rows: picks each head's (cos, sin) pair from the [.., 2, 2, d] tables below.
        self.qk_rows = torch.tensor([0] * self.nh + [1] * self.nkv, device=k0.device)
        self.scaling = self.base.layers[0].self_attn.scaling
        self.rope_table = None
        if getattr(self.base.rotary_emb, "rope_type", "default") not in _POSITION_DEPENDENT_ROPE:
            pos_1P = torch.arange(L0 + max_new, device=k0.device)[None]  # every position a row can reach
            cos, sin = self.base.rotary_emb(k0[:1, 0, :1, :1], pos_1P)
            self.rope_table = self._qk_rope(cos[0], sin[0])  # [P, 2, 2, d]

    def _qk_rope(self, cos_ND: torch.Tensor, sin_ND: torch.Tensor) -> torch.Tensor:
        """[N, 2, 2, d]: (cos, sin with its first half negated) x (q: times the attention scale, k)."""
        hd = self.hd
        sin_ND = torch.cat((-sin_ND[..., : hd // 2], sin_ND[..., hd // 2:]), -1)
        cs_N2D = torch.stack((cos_ND, sin_ND), 1)
        return torch.stack((cs_N2D * self.scaling, cs_N2D), 2)

    def head(self, hidden_BH: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] of the output head given at construction, from what `step` returns."""
        if self.head_packed is not None:
            return packed_linear(hidden_BH, self.head_packed)
        return thin_linear(hidden_BH, self.head_VH).contiguous()

    def step(self, tok_B: torch.Tensor, pos_B: torch.Tensor) -> torch.Tensor:
        """The final hidden state [B, H] after feeding tok_B at positions pos_B, for `head`:
        normalised, and on packed weights not yet scaled by the final norm's weight (the
        packed head holds it)."""
        x_BH = self.base.embed_tokens(tok_B)
        if self.rope_table is not None:
            cs_B22D = self.rope_table.index_select(0, pos_B)
        else:  # dynamic / longrope scaling depends on the positions seen so far: asked each step
            cos, sin = self.base.rotary_emb(x_BH, pos_B[:, None])
            cs_B22D = self._qk_rope(cos[:, 0], sin[:, 0])
        cs_B2AD = cs_B22D.index_select(2, self.qk_rows)  # [B, cos/sin, q heads + k heads, d]
        self.length += 1
        if self.packed_layers is not None:
            return self._packed_layers(x_BH, cs_B2AD[:, 0], cs_B2AD[:, 1])
        return self._model_layers(x_BH, cs_B2AD[:, 0], cs_B2AD[:, 1])

    def _packed_layers(self, x_BH: torch.Tensor, cos_BAD: torch.Tensor, sin_BAD: torch.Tensor) -> torch.Tensor:
        # The hot path on CPU: straight calls, nothing per layer that Python can leave out (see the module docstring).
        linear, linear_add = torch.ops.mkldnn._linear_pointwise, torch.ops.mkldnn._linear_pointwise.binary
        H = x_BH.shape[-1:]
        for (w_qkv, b_qkv, w_o, b_o, w_gu, b_gu, w_down, b_down, eps_in, eps_post, q_norm, k_norm), k_cache, v_cache \
                in zip(self.packed_layers, self.k_cache, self.v_cache):
            qkv_BN = linear(F.rms_norm(x_BH, H, None, eps_in), w_qkv, b_qkv, "none", [], "")
            o_BH = self._attend(qkv_BN, None, q_norm, k_norm, cos_BAD, sin_BAD, k_cache, v_cache)
            x_BH = linear_add(o_BH, x_BH, w_o, b_o, "add")
            g_BF, u_BF = linear(F.rms_norm(x_BH, H, None, eps_post), w_gu, b_gu, "none", [], "").chunk(2, -1)
            x_BH = linear_add(F.silu(g_BF).mul_(u_BF), x_BH, w_down, b_down, "add")
        return F.rms_norm(x_BH, H, None, self.base.norm.variance_epsilon)

    def _model_layers(self, x_BH: torch.Tensor, cos_BAD: torch.Tensor, sin_BAD: torch.Tensor) -> torch.Tensor:
        for lay, k_cache, v_cache in zip(self.base.layers, self.k_cache, self.v_cache):
            a, m = lay.self_attn, lay.mlp
            h_BH = _rms(x_BH, lay.input_layernorm)
            q, k, v = (thin_linear(h_BH, p.weight, p.bias) for p in (a.q_proj, a.k_proj, a.v_proj))
            o_BH = self._attend(torch.cat((q, k), -1), v, getattr(a, "q_norm", None), getattr(a, "k_norm", None),
                                cos_BAD, sin_BAD, k_cache, v_cache)
            x_BH = x_BH + thin_linear(o_BH, a.o_proj.weight, a.o_proj.bias)
            h_BH = _rms(x_BH, lay.post_attention_layernorm)
            gate_BF, up_BF = (thin_linear(h_BH, p.weight, p.bias) for p in (m.gate_proj, m.up_proj))
            x_BH = x_BH + thin_linear(F.silu(gate_BF) * up_BF, m.down_proj.weight, m.down_proj.bias)
        return _rms(x_BH, self.base.norm)

    def _attend(self, qk_BN: torch.Tensor, v_BN: torch.Tensor | None, q_norm: nn.Module | None,
                k_norm: nn.Module | None, cos_BAD: torch.Tensor, sin_BAD: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """Attention output [B, nh*d] for the new token. qk_BN: q then k ([B, (nh+kv)*d]),
        followed by v when v_BN is None (the stacked projection's output)."""
        B, nh, nkv, hd, L = qk_BN.shape[0], self.nh, self.nkv, self.hd, self.length
        if v_BN is None:
            v_BN = qk_BN[:, (nh + nkv) * hd:]
        qk_BAD = qk_BN[:, : (nh + nkv) * hd].view(B, nh + nkv, hd)
        if q_norm is not None:  # Qwen3: RMSNorm per head before RoPE
            qk_BAD = torch.cat((_rms(qk_BAD[:, :nh], q_norm), _rms(qk_BAD[:, nh:], k_norm)), 1)
        # One RoPE pass over q and k; q comes out already scaled by 1/sqrt(d).
        qk_BAD = _rope(qk_BAD, cos_BAD, sin_BAD)
        k_cache[:, :, L - 1] = qk_BAD[:, nh:]
        v_cache[:, :, L - 1] = v_BN.view(B, nkv, hd)
        # Query heads grouped under their shared key/value head (as repeat_kv lays them out),
        # one bmm over the B*kv groups: 3-D bmm took 78 us where 4-D matmul took 131 (B = 8).
        q_NGD = qk_BAD[:, :nh].reshape(B * nkv, nh // nkv, hd)
        s_NGL = torch.bmm(q_NGD, k_cache.view(B * nkv, -1, hd)[:, :L].transpose(1, 2))
        if self.bias_B11L is not None:
            s_NGL.view(B, nkv, -1, L).add_(self.bias_B11L[..., :L])
        p_NGL = torch.softmax(s_NGL, dim=-1, dtype=torch.float32).to(q_NGD.dtype)
        return torch.bmm(p_NGL, v_cache.view(B * nkv, -1, hd)[:, :L]).view(B, nh * hd)
