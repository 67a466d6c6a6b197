"""Batched sampling from a Hugging Face causal LM with a KV cache.

A lean decode loop rather than `model.generate`: one forward per new token, the sampled
token's log-probability kept as it is drawn (these are the PPO "old" log-probs and the
student side of the token advantage), and an early exit once every row has hit EOS.

Log-probs are taken under logits / temperature, the distribution the token was actually
drawn from (before top-p truncation, as verl and TRL do); the update uses the same
temperature, so the PPO ratio starts at exactly 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel

from uniopd.config import RolloutConfig


@dataclass
class Sample:
    """One rollout: the response tokens and their log-probs under the sampling policy."""

    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    finished: bool  # ended with EOS (False: cut at max_new_tokens)
    extra: dict = field(default_factory=dict)


def sample_top_p(logits_BV: torch.Tensor, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    probs_BV = torch.softmax(logits_BV, dim=-1)
    if top_p < 1.0:
        sorted_p, sorted_idx = probs_BV.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        outside = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_p, 1, generator=generator)
        return sorted_idx.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_batch(model: PreTrainedModel, prompts: list[list[int]], *, eos_ids: set[int], pad_id: int,
                   max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                   min_new_tokens: int = 0, generator: torch.Generator | None = None,
                   greedy: bool = False) -> list[Sample]:
    """Sample one response per prompt (prompts are token ids; rows are left-padded here)."""
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
    eos_t = torch.tensor(sorted(eos_ids), device=device)
    cache = DynamicCache()
    out = model(input_ids=ids_BP, attention_mask=attn_BL, position_ids=pos_BP, past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    logits_BV = out.logits[:, -1, :].float()
    next_pos_B1 = pos_BP[:, -1:] + 1

    tokens, logps = [], []
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        scaled_BV = logits_BV / temperature
        if t < min_new_tokens:
            scaled_BV[:, eos_t] = float("-inf")
        logp_BV = torch.log_softmax(scaled_BV, dim=-1)
        tok_B = scaled_BV.argmax(-1) if greedy else sample_top_p(scaled_BV, top_p, generator)
        tok_B = torch.where(done_B, torch.full_like(tok_B, pad_id), tok_B)
        tokens.append(tok_B)
        logps.append(logp_BV.gather(-1, tok_B[:, None]).squeeze(-1))
        done_B = done_B | torch.isin(tok_B, eos_t)
        if bool(done_B.all()) or t == max_new_tokens - 1:
            break
        attn_BL = torch.cat([attn_BL, torch.ones((B, 1), dtype=attn_BL.dtype, device=device)], dim=1)
        out = model(input_ids=tok_B[:, None], attention_mask=attn_BL, position_ids=next_pos_B1,
                    past_key_values=cache, use_cache=True)
        logits_BV = out.logits[:, -1, :].float()
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
             greedy: bool = False) -> list[list[Sample]]:
    """n samples for each prompt, decoded in batches of `cfg.batch_size` sequences.

    Returns one list of n samples per prompt (the group). Sequences are sorted by prompt
    length before batching so rows in a batch need little padding.
    """
    flat = [(i, p) for i, p in enumerate(prompts) for _ in range(n)]
    order = sorted(range(len(flat)), key=lambda j: len(flat[j][1]))
    results: list[Sample | None] = [None] * len(flat)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start: start + cfg.batch_size]
            batch = generate_batch(model, [flat[j][1] for j in idx], eos_ids=eos_ids, pad_id=pad_id,
                                   max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                   top_p=cfg.top_p, min_new_tokens=cfg.min_new_tokens,
                                   generator=generator, greedy=greedy)
            for j, sample in zip(idx, batch):
                results[j] = sample
    finally:
        model.train(was_training)
    groups: list[list[Sample]] = [[] for _ in prompts]
    for (i, _), sample in zip(flat, results):
        groups[i].append(sample)
    return groups
