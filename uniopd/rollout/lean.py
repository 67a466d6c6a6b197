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
weights while decoding; elsewhere (GPU, bf16) a projection is (W @ h^T)^T.
Attention is two batched matmuls over grouped query heads instead of a fused kernel that
was slower for one query, and the key/value cache is written in place rather than
concatenated each step. Prefill still runs through the model (its masks, attention kernel
and multimodal inputs); this module takes over from the filled cache. Anything it does not
recognise (other model types, sliding windows, other activations) leaves decoding to the
model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from uniopd.models.packed import can_pack, pack, thin_linear

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")
PACK_MIN_STEPS = 8  # packing costs about as much as two decode steps: not worth it for a few tokens


def _rms(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    # As the HF RMSNorms of these families: statistics in fp32, weight applied in the input dtype.
    xf = x.float()
    return norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)).to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


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
        self.packed: dict = {}  # weight tensor id -> its oneDNN layout for B rows
        if max_new >= PACK_MIN_STEPS and can_pack(self.base.layers[0].mlp.down_proj.weight):
            weights = [lin.weight for lay in self.base.layers
                       for lin in (lay.self_attn.q_proj, lay.self_attn.k_proj, lay.self_attn.v_proj,
                                   lay.self_attn.o_proj, lay.mlp.gate_proj, lay.mlp.up_proj, lay.mlp.down_proj)]
            weights += [head_VH] if head_VH is not None else []
            self.packed = {id(w): pack(w, B) for w in weights}

    def _proj(self, h_BK: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
        return thin_linear(h_BK, lin.weight, lin.bias, packed=self.packed.get(id(lin.weight)))

    def head(self, hidden_BH: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] of the output head given at construction."""
        return thin_linear(hidden_BH, self.head_VH, packed=self.packed.get(id(self.head_VH))).contiguous()

    def step(self, tok_B: torch.Tensor, pos_B: torch.Tensor) -> torch.Tensor:
        """The final-norm hidden state [B, H] after feeding tok_B at positions pos_B."""
        B, nh, nkv, hd = tok_B.shape[0], self.nh, self.nkv, self.hd
        L = self.length + 1
        x_BH = self.base.embed_tokens(tok_B)
        cos, sin = self.base.rotary_emb(x_BH, pos_B[:, None])  # [B, 1, d]
        cos, sin = cos[:, None], sin[:, None]
        bias = None if self.bias_B11L is None else self.bias_B11L[..., :L]
        for lay, k_cache, v_cache in zip(self.base.layers, self.k_cache, self.v_cache):
            a, m = lay.self_attn, lay.mlp
            h_BH = _rms(x_BH, lay.input_layernorm)
            q = self._proj(h_BH, a.q_proj).view(B, nh, 1, hd)
            k = self._proj(h_BH, a.k_proj).view(B, nkv, 1, hd)
            if hasattr(a, "q_norm"):  # Qwen3
                q, k = _rms(q, a.q_norm), _rms(k, a.k_norm)
            k_cache[:, :, L - 1: L] = _rope(k, cos, sin)
            v_cache[:, :, L - 1: L] = self._proj(h_BH, a.v_proj).view(B, nkv, 1, hd)
            # Query heads grouped under their shared key/value head (as repeat_kv lays them out).
            q_BKGD = _rope(q, cos, sin).view(B, nkv, nh // nkv, hd)
            s_BKGL = (q_BKGD @ k_cache[:, :, :L].transpose(2, 3)) * a.scaling
            if bias is not None:
                s_BKGL = s_BKGL + bias
            p_BKGL = torch.softmax(s_BKGL, dim=-1, dtype=torch.float32).to(q.dtype)
            o_BH = (p_BKGL @ v_cache[:, :, :L]).reshape(B, nh * hd)
            x_BH = x_BH + self._proj(o_BH, a.o_proj)
            h_BH = _rms(x_BH, lay.post_attention_layernorm)
            x_BH = x_BH + self._proj(F.silu(self._proj(h_BH, m.gate_proj)) * self._proj(h_BH, m.up_proj), m.down_proj)
        self.length = L
        return _rms(x_BH, self.base.norm)
