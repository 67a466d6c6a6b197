"""Running the prompt tokens that sequences of a micro-batch share once, not once per row.

A micro-batch of B right-padded sequences (prompt + response, the longest L tokens) costs
B·L positions in every layer. Rows that start with the same C tokens have the same keys and
values there, so each group g of such rows runs its C_g prefix positions once, and each row
runs only the rest of its sequence, attending to its group's prefix through the model's
key/value cache:

    K_b = [K_prefix(g(b)) ; K_b,rest],  V_b likewise,  the rest at positions C_g(b), C_g(b)+1, ...

This is the same attention as the full forward: hidden states agree to fp32 rounding. With
gradients, a prefix collects the gradients of all its rows, as identical rows do in the full
forward. Two plans:

* header: one prefix for all rows, the tokens every prompt starts with (a chat template's
  system header);
* groups: rows with the same prompt (rollout.n > 1) share all of it but its last token, which
  predicts the first response token and so stays in each row's own part.

`plan_prefix` keeps whichever computes fewer positions, padding included: C + B(L - C) for
the header, G·max C_g + B·max R_b for G groups with rests R_b. It shares only when that
saves at least PREFIX_MIN_SAVED positions. Used by `uniopd.models.forward.response_hidden`.
It covers only the Llama-style families with full attention (`uniopd.models.families`), and
not while gradient checkpointing replays layers (a replayed layer would append to the cache
twice).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from uniopd.models.compat import cache_kwargs
from uniopd.models.families import full_attention_llama_reason

PREFIX_MIN_SAVED = 16  # positions saved below which the extra forward call is not worth it


@dataclass
class PrefixPlan:
    """group_B: each row's group; len_G: each group's prefix length (>= 1); rep_G: a row of
    each group, whose first len_G tokens are the group's prefix."""

    group_B: list[int]
    len_G: list[int]
    rep_G: list[int]

    def offsets(self) -> list[int]:
        """Each row's prefix length: where its own part starts."""
        return [self.len_G[g] for g in self.group_B]


def shared_prefix_len(prompt_ids: list[list[int]]) -> int:
    """Tokens every prompt starts with, up to the shortest prompt's length - 1."""
    if not prompt_ids:
        return 0
    limit = min(len(p) for p in prompt_ids) - 1
    first = prompt_ids[0]
    c = 0
    while c < limit and all(p[c] == first[c] for p in prompt_ids):
        c += 1
    return c


def plan_prefix(prompt_ids: list[list[int]], lengths: list[int]) -> PrefixPlan | None:
    """The cheaper of the header and group plans for rows with these prompts and total
    sequence lengths, or None when neither saves PREFIX_MIN_SAVED positions."""
    B = len(prompt_ids)
    if B < 2:
        return None
    L = max(lengths)
    plans: list[tuple[int, PrefixPlan]] = []
    C = shared_prefix_len(prompt_ids)
    if C:
        plans.append((C + B * (L - C), PrefixPlan([0] * B, [C], [0])))
    group_of: dict[tuple[int, ...], int] = {}
    group_B = [group_of.setdefault(tuple(p), len(group_of)) for p in prompt_ids]
    if len(group_of) < B and min(len(p) for p in prompt_ids) >= 2:
        rep_G = [group_B.index(g) for g in range(len(group_of))]
        len_G = [len(prompt_ids[r]) - 1 for r in rep_G]
        rest = max(n - len_G[g] for n, g in zip(lengths, group_B))
        plans.append((len(rep_G) * max(len_G) + B * rest, PrefixPlan(group_B, len_G, rep_G)))
    cost, plan = min(plans, key=lambda cp: cp[0], default=(B * L, None))
    return plan if cost <= B * L - PREFIX_MIN_SAVED else None


def can_share_prefix(model) -> bool:
    """Whether this model's forward may run shared prefixes once (see the module docstring)."""
    if full_attention_llama_reason(model.config) is not None:
        return False
    # transformers 5 renamed the flag; reading the old name only warns there.
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"
    return not (torch.is_grad_enabled() and getattr(model, flag, False))


def hidden_with_prefix(base: torch.nn.Module, ids_BL: torch.Tensor, lengths: list[int],
                       plan: PrefixPlan) -> torch.Tensor | None:
    """Final hidden states [B, R, H] of each row's own part (row b's position p at index
    p - plan.offsets()[b]), or None when this transformers' cache has no per-layer tensors."""
    from transformers import DynamicCache

    cache = DynamicCache()
    if not hasattr(cache, "layers"):
        return None
    device = ids_BL.device
    B, G, C = ids_BL.shape[0], len(plan.len_G), max(plan.len_G)
    off_B = plan.offsets()
    R = max(n - c for n, c in zip(lengths, off_B))
    len_G1 = torch.tensor(plan.len_G, device=device)[:, None]
    prefix_mask_GC = (torch.arange(C, device=device)[None] < len_G1).long()
    base(input_ids=ids_BL[plan.rep_G, :C], attention_mask=prefix_mask_GC, use_cache=True,
         **cache_kwargs(base, cache))
    group_B = torch.tensor(plan.group_B, device=device)
    for layer in cache.layers:  # each row sees its group's prefix (a broadcast, not a copy, for one group)
        layer.keys = layer.keys.expand(B, -1, -1, -1) if G == 1 else layer.keys.index_select(0, group_B)
        layer.values = layer.values.expand(B, -1, -1, -1) if G == 1 else layer.values.index_select(0, group_B)
    # Row b's own part, left-aligned: tokens off_b..len_b-1 at positions off_b, off_b+1, ...
    rest_ids_BR = torch.zeros((B, R), dtype=ids_BL.dtype, device=device)
    rest_mask_BR = torch.zeros((B, R), dtype=torch.long, device=device)
    for b, (n, c) in enumerate(zip(lengths, off_B)):
        rest_ids_BR[b, : n - c] = ids_BL[b, c:n]
        rest_mask_BR[b, : n - c] = 1
    mask_B_CR = torch.cat((prefix_mask_GC[group_B], rest_mask_BR), 1)
    pos_BR = torch.tensor(off_B, device=device)[:, None] + torch.arange(R, device=device)[None]
    out = base(input_ids=rest_ids_BR, attention_mask=mask_B_CR, position_ids=pos_BR, **cache_kwargs(base, cache),
               use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
