"""Batched sampling from a Hugging Face causal LM with a KV cache.

A lean decode loop rather than `model.generate`: one forward per new token, the sampled
token's log-probability kept as it is drawn (these are the PPO "old" log-probs and the
student side of the token advantage), and an early exit once every row has hit EOS.

Log-probs are taken under logits / temperature, the distribution the token was actually
drawn from (before top-p truncation, as verl and TRL do); the update uses the same
temperature, so the PPO ratio starts at exactly 1.

Per decode step: on CPU the body of Llama/Mistral/Qwen2/Qwen3 text models runs through
`uniopd.cpu.lean` (chosen once, when the engine is built; the model's own base forward
otherwise) and the output head as a `thin_linear` (on oneDNN-packed weights in the lean
path, W @ h^T otherwise); tokens are drawn by inverse CDF with one uniform per row from the
caller's generator (reproducible, but a different random stream from torch.multinomial's);
the attention mask is preallocated, or left out when no row is padded.

`HFEngine` is this loop behind the rollout-engine seam (`rollout.backend: hf`): it samples
from the trainer's own module, so an optimizer step is seen by the next rollout at once.
"""

from __future__ import annotations

import logging

import torch
from transformers import DynamicCache, PreTrainedModel

from uniopd.batch import Sample
from uniopd.config import RolloutConfig
from uniopd.cpu.lean import LeanDecoder, unsupported_reason
from uniopd.cpu.packed import thin_linear
from uniopd.data.prompts import PromptLimit
from uniopd.models.compat import cache_kwargs
from uniopd.models.forward import base_model, max_positions, output_head, vocab_limit
from uniopd.models.loading import LoadedModel
from uniopd.rollout.base import EngineSupport, RolloutEngine, positions_limit

log = logging.getLogger(__name__)


CDF_BLOCK = 512  # vocabulary entries per block of the two-level inverse CDF


def _inverse_cdf(weights_BV: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row, drawn with probability weight / row total, by inverse CDF.

    One uniform per row from `generator` (torch.multinomial draws one exponential per
    vocabulary entry: at V = 49k that was most of the sampling time). Two levels: the
    uniform first picks a block of CDF_BLOCK entries by the blocks' cumulative sums, then an
    entry inside it; a full-vocabulary cumsum is sequential and cost ~3 ms a decode step at
    B = 8, V = 49k, a blockwise sum is vectorised. Sums are in float64 so a token of
    probability 1e-7 keeps its mass. The uniform is kept below each level's total, so the
    first index whose CDF exceeds it always has a positive weight.
    """
    B, V = weights_BV.shape
    nb = -(-V // CDF_BLOCK)
    w_BNK = torch.nn.functional.pad(weights_BV, (0, nb * CDF_BLOCK - V)).view(B, nb, CDF_BLOCK)
    cdf_BN = w_BNK.sum(-1, dtype=torch.float64).cumsum(-1)
    total_B1 = cdf_BN[:, -1:]
    if not bool(((total_B1 > 0) & torch.isfinite(total_B1)).all()):
        raise RuntimeError("cannot sample: a row's probabilities are all zero, or inf/nan")
    u_B1 = torch.rand(total_B1.shape, generator=generator, dtype=torch.float64, device=cdf_BN.device) * total_B1
    u_B1 = torch.minimum(u_B1, torch.nextafter(total_B1, torch.zeros_like(total_B1)))
    block_B1 = torch.searchsorted(cdf_BN, u_B1, right=True)
    below_B1 = torch.where(block_B1 > 0, cdf_BN.gather(-1, (block_B1 - 1).clamp(min=0)), 0.0)
    rows_B = torch.arange(B, device=weights_BV.device)
    inner_cdf_BK = w_BNK[rows_B, block_B1.squeeze(-1)].to(torch.float64).cumsum(-1)
    # The block's own cumsum may round differently from its sum above: stay below it too.
    inner_total_B1 = inner_cdf_BK[:, -1:]
    u_B1 = torch.minimum(u_B1 - below_B1, torch.nextafter(inner_total_B1, torch.zeros_like(inner_total_B1)))
    inner_B = torch.searchsorted(inner_cdf_BK, u_B1, right=True).squeeze(-1)
    return block_B1.squeeze(-1) * CDF_BLOCK + inner_B


def _sample_probs(probs_BV: torch.Tensor, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """A token per row from probabilities [B, V], restricted to the top-p nucleus when top_p < 1."""
    if top_p < 1.0:
        sorted_p, sorted_idx = probs_BV.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        outside = sorted_p.cumsum(-1) - sorted_p >= top_p
        choice_B = _inverse_cdf(sorted_p.masked_fill_(outside, 0.0), generator)
        return sorted_idx.gather(-1, choice_B[:, None]).squeeze(-1)
    return _inverse_cdf(probs_BV, generator)


def sample_top_p(logits_BV: torch.Tensor, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """A token per row from softmax(logits) [B, V] (top-p nucleus when top_p < 1)."""
    return _sample_probs(torch.softmax(logits_BV, dim=-1), top_p, generator)


def _fast_head(model: PreTrainedModel) -> torch.Tensor | None:
    """The [V, H] output weight when logits are plainly base(x) @ W^T, else None."""
    try:
        return output_head(model)
    except ValueError:
        return None


@torch.inference_mode()
def generate_batch(model: PreTrainedModel, prompts: list[list[int]], *, eos_ids: set[int], pad_id: int,
                   max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                   min_new_tokens: int = 0, generator: torch.Generator | None = None,
                   greedy: bool = False, multimodal: list | None = None,
                   suppress_ids: list[int] | None = None, lean: bool = False) -> list[Sample]:
    """Sample one response per prompt (prompts are token ids; rows are left-padded here).

    multimodal: one `uniopd.models.multimodal.MultimodalInputs` (or None) per prompt, for
    vision-language models; suppress_ids: tokens never sampled (a VLM's image placeholders).
    Both default to None, the text path. lean: run the decode steps of text prompts through
    `uniopd.cpu.lean` (the caller checked `lean_decode_reason`); else the model's forward.
    """
    device = next(model.parameters()).device
    B = len(prompts)
    P = max(len(p) for p in prompts)
    ids_BP = torch.full((B, P), pad_id, dtype=torch.long)
    attn_BL = torch.zeros((B, P), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids_BP[b, P - len(p):] = torch.tensor(p, dtype=torch.long)
        attn_BL[b, P - len(p):] = 1
    ids_BP, attn_BL = ids_BP.to(device), attn_BL.to(device)
    # Left padding shifts positions; recompute them so each row starts at position 0.
    pos_BP = (attn_BL.cumsum(-1) - 1).clamp(min=0)
    extra: dict = {}
    if multimodal is not None:
        # Vision inputs for the prefill; M-RoPE models get [3, B, P] positions from their own rope index.
        from uniopd.models.multimodal import prefill_inputs

        extra, mrope_pos = prefill_inputs(model, ids_BP, attn_BL, multimodal, [len(p) for p in prompts])
        pos_BP = pos_BP if mrope_pos is None else mrope_pos
    eos_t = torch.tensor(sorted(eos_ids), device=device)
    suppress_t = torch.tensor(sorted(suppress_ids), device=device) if suppress_ids else None
    cache = DynamicCache()
    V = vocab_limit(model)  # a head padded past the tokenizer: its padded rows are never sampled
    out = model(input_ids=ids_BP, attention_mask=attn_BL, position_ids=pos_BP, **cache_kwargs(model, cache),
                use_cache=True, logits_to_keep=1, **extra)
    logits_BV = out.logits[:, -1, :V].float()
    next_pos_B1 = pos_BP[..., -1:] + 1  # [B, 1], or [3, B, 1] with M-RoPE

    # Decode steps run the base model and apply the head themselves (see thin_linear).
    head_VH = _fast_head(model)
    body = base_model(model) if head_VH is not None else None
    decoder = None
    if lean and body is not None and multimodal is None and hasattr(cache, "layers"):
        decoder = LeanDecoder(model, cache, attn_BL, max_new_tokens, head_VH=head_VH)
    # One preallocated mask, sliced per step; none at all when no row is padded (text only).
    L0 = attn_BL.shape[1]
    mask_BL = None
    if decoder is None and (multimodal is not None or not bool(attn_BL.all())):
        mask_BL = torch.ones((B, L0 + max_new_tokens), dtype=attn_BL.dtype, device=device)
        mask_BL[:, :L0] = attn_BL
    pad_B = torch.full((B,), pad_id, dtype=torch.long, device=device)
    tokens, logps = [], []
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        scaled_BV = logits_BV / temperature if temperature != 1.0 else logits_BV
        if t < min_new_tokens:
            scaled_BV[:, eos_t] = float("-inf")
        if suppress_t is not None:
            scaled_BV[:, suppress_t] = float("-inf")
        logp_BV = torch.log_softmax(scaled_BV, dim=-1)
        tok_B = logp_BV.argmax(-1) if greedy else _sample_probs(logp_BV.exp(), top_p, generator)
        tok_B = torch.where(done_B, pad_B, tok_B)
        tokens.append(tok_B)
        logps.append(logp_BV.gather(-1, tok_B[:, None]).squeeze(-1))
        done_B = done_B | torch.isin(tok_B, eos_t)
        if t == max_new_tokens - 1 or (t >= min_new_tokens and bool(done_B.all())):
            break
        step_mask = None if mask_BL is None else mask_BL[:, : L0 + t + 1]
        if decoder is not None:
            logits_BV = decoder.head(decoder.step(tok_B, next_pos_B1[:, 0])).float()
        elif body is not None:
            out = body(input_ids=tok_B[:, None], attention_mask=step_mask, position_ids=next_pos_B1,
                       **cache_kwargs(body, cache), use_cache=True)
            hidden_BH = (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])[:, -1, :]
            logits_BV = thin_linear(hidden_BH, head_VH).contiguous().float()
        else:
            out = model(input_ids=tok_B[:, None], attention_mask=step_mask, position_ids=next_pos_B1,
                        **cache_kwargs(model, cache), use_cache=True)
            logits_BV = out.logits[:, -1, :V].float()
        next_pos_B1 = next_pos_B1 + 1

    tok_BT = torch.stack(tokens, 1).cpu()
    logp_BT = torch.stack(logps, 1).float().cpu()
    samples = []
    for b in range(B):
        row = tok_BT[b].tolist()
        end = next((i + 1 for i, tok in enumerate(row) if tok in eos_ids), None)
        n = end if end is not None else len(row)
        samples.append(Sample(list(prompts[b]), row[:n], logp_BT[b, :n].tolist(), end is not None))
    return samples


def generate(model: PreTrainedModel, prompts: list[list[int]], cfg: RolloutConfig, *, n: int,
             eos_ids: set[int], pad_id: int, generator: torch.Generator | None = None,
             greedy: bool = False, multimodal: list | None = None,
             suppress_ids: list[int] | None = None, lean: bool | None = None) -> list[list[Sample]]:
    """n samples for each prompt, decoded in batches of `cfg.batch_size` sequences.

    lean: decode steps on the lean CPU path (None: where `lean_decode_reason` allows it).

    Returns one list of n samples per prompt (the group). Sequences are sorted by prompt
    length before batching so rows in a batch need little padding.
    """
    if lean is None:
        lean = lean_decode_reason(model, cfg.decode) is None
    flat = [(i, p) for i, p in enumerate(prompts) for _ in range(n)]
    order = sorted(range(len(flat)), key=lambda j: len(flat[j][1]))
    results: list[Sample | None] = [None] * len(flat)
    was_training = model.training
    threads = torch.get_num_threads()
    switch = bool(cfg.threads) and cfg.threads != threads and next(model.parameters()).device.type == "cpu"
    model.eval()
    try:
        if switch:
            torch.set_num_threads(cfg.threads)
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start: start + cfg.batch_size]
            batch = generate_batch(model, [flat[j][1] for j in idx], eos_ids=eos_ids, pad_id=pad_id,
                                   max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                   top_p=cfg.top_p, min_new_tokens=cfg.min_new_tokens,
                                   generator=generator, greedy=greedy, suppress_ids=suppress_ids, lean=lean,
                                   multimodal=None if multimodal is None else [multimodal[flat[j][0]] for j in idx])
            for j, sample in zip(idx, batch):
                results[j] = sample
    finally:
        if switch:
            torch.set_num_threads(threads)
        model.train(was_training)
    groups: list[list[Sample]] = [[] for _ in prompts]
    for (i, _), sample in zip(flat, results):
        groups[i].append(sample)
    return groups


def lean_decode_reason(model: PreTrainedModel, decode: str) -> str | None:
    """Why decode steps cannot take the lean CPU path (None: they can)."""
    if decode == "hf":
        return "rollout.decode=hf"
    device = next(model.parameters()).device
    if device.type != "cpu":
        return f"the model is on {device.type}, and the lean path is a CPU path"
    if any(type(p.data).__name__ == "DTensor" for p in model.parameters()):
        return "the weights are sharded"
    return unsupported_reason(model)


class HFEngine(RolloutEngine):
    """The batched KV-cache loop above, on the trainer's own module (no weight copy to sync)."""

    support = EngineSupport(images=True, weight_sync="shared")

    def __init__(self, cfg: RolloutConfig, student: LoadedModel, *, suppress_ids: list[int] | None = None):
        super().__init__(cfg, student, suppress_ids=suppress_ids)
        tok = student.tokenizer
        self.eos_ids, self.pad_id = {tok.eos_token_id}, tok.pad_token_id
        reason = lean_decode_reason(student.model, cfg.decode)
        self.lean = reason is None
        log.info("rollout: hf engine; decode steps on %s", "the lean CPU path" if self.lean
                 else f"the model's forward ({reason})")

        # Checked here, before any prompt is prepared, as vLLM checks its max_model_len.
        self.max_positions = max_positions(student.model)
        if self.max_positions is not None:
            self.prompt_limit(1)

    def prompt_limit(self, max_prompt_tokens: int) -> PromptLimit:
        if self.max_positions is None:
            return super().prompt_limit(max_prompt_tokens)
        return positions_limit(max_prompt_tokens, self.max_positions, self.cfg.max_new_tokens,
                               f"the student's max_position_embeddings={self.max_positions}", "the hf engine")

    def sample(self, prompts: list[list[int]], n: int, *, multimodal: list | None = None, greedy: bool = False,
               generator: torch.Generator | None = None) -> list[list[Sample]]:
        return generate(self.student.model, prompts, self.cfg, n=n, eos_ids=self.eos_ids, pad_id=self.pad_id,
                        generator=generator, greedy=greedy, multimodal=multimodal,
                        suppress_ids=self.suppress_ids or None, lean=self.lean)
