"""Forward passes that return what OPD needs and no more.

A [B, L, V] logits tensor is the largest object in a step (150k vocabulary × 4×512 tokens
is 1.2 GB in fp32). So we run the model's *base* (no lm_head), keep only the hidden states
at positions that predict response tokens (N of them, flattened), and apply the output
head chunk by chunk (`uniopd.algo.losses.chunked`). Teachers and students use the same
layout, so a teacher with a different prompt (its own view) lines up token for token.

Shared prompt prefix. When every sequence of a micro-batch starts with the same C tokens
(a chat template's system header; all of the prompt when rollout.n > 1 and a micro-batch
holds one group), those C positions are run once as a batch of one and their keys/values
broadcast to the B rows, so the body computes C + B(L - C) positions instead of BL:

    K_b = [K_prefix ; K_b,rest],  V_b likewise,  for every layer and row b

which is the same attention as the full forward (results agree to fp32 rounding; with
gradients, the broadcast sums the rows' gradients into the prefix, as the full forward
does across identical rows). Only the four Llama-style families whose cache
`uniopd.rollout.lean` also relies on, without sliding windows, and not while gradient
checkpointing recomputes layers (a replayed layer would append to the cache twice).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers import PreTrainedModel


@dataclasses.dataclass
class ResponseLayout:
    """Prompt+response sequences, right-padded, with the response positions flattened.

    input_ids_BL / attention_mask_BL: the model input.
    pred_index_N: flat index (b * L + position) of each position whose next token is a
        response token; target_ids_N: that response token.
    row_N / col_N: the response token's sequence and its index inside the response, so a
        flat tensor can be scattered back to [B, T].
    """

    input_ids_BL: torch.Tensor
    attention_mask_BL: torch.Tensor
    pred_index_N: torch.Tensor
    target_ids_N: torch.Tensor
    row_N: torch.Tensor
    col_N: torch.Tensor
    num_rows: int
    max_response: int
    prefix_len: int = 0  # leading tokens every row shares, run once (0: none; see the module docstring)

    def to_padded(self, values_N: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        out = values_N.new_full((self.num_rows, self.max_response), fill)
        out[self.row_N, self.col_N] = values_N
        return out

    def from_padded(self, values_BT: torch.Tensor) -> torch.Tensor:
        return values_BT[self.row_N, self.col_N]


PREFIX_MIN_SAVED = 16  # positions saved, C * (B - 1), below which the extra forward call is not worth it


def shared_prefix_len(prompt_ids: list[list[int]]) -> int:
    """Tokens every prompt starts with, up to the shortest prompt's length - 1 (the last prompt
    position predicts the first response token, so it must stay in each row's own part);
    0 when that would save fewer than PREFIX_MIN_SAVED positions."""
    if len(prompt_ids) < 2:
        return 0
    limit = min(len(p) for p in prompt_ids) - 1
    first = prompt_ids[0]
    c = 0
    while c < limit and all(p[c] == first[c] for p in prompt_ids):
        c += 1
    return c if c * (len(prompt_ids) - 1) >= PREFIX_MIN_SAVED else 0


def build_layout(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int,
                 device: torch.device | str = "cpu", *, share_prefix: bool = False) -> ResponseLayout:
    """share_prefix: record the prompts' common prefix (`shared_prefix_len`) for
    `response_hidden` to run once."""
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    B, L = len(lengths), max(lengths)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    pred, tgt, rows, cols = [], [], [], []
    for b, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        seq = list(p) + list(r)
        ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attn[b, : len(seq)] = 1
        start = len(p) - 1  # the last prompt position predicts the first response token
        pred.extend(b * L + start + j for j in range(len(r)))
        tgt.extend(r)
        rows.extend([b] * len(r))
        cols.extend(range(len(r)))
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    return ResponseLayout(ids.to(device), attn.to(device), as_long(pred), as_long(tgt), as_long(rows),
                          as_long(cols), B, max((len(r) for r in response_ids), default=0),
                          shared_prefix_len(prompt_ids) if share_prefix else 0)


_VOCAB_LIMIT_ATTR = "_uniopd_vocab_limit"


def limit_vocabulary(model: PreTrainedModel, vocab_size: int) -> None:
    """Sample and score only token ids < vocab_size (the tokenizer's) when the output head is
    padded past them (Qwen2.5-1.5B: 151,936 head rows, 7B: 152,064, for 151,665 tokens).

    Padded rows are not tokens: a random or lightly trained model can give them mass, the
    rollout could then sample ids no tokenizer decodes, and two models padded differently
    would normalise over different supports. With the limit set, `output_head` returns the
    first vocab_size rows, so rollout, update and teacher scoring all use the distribution
    restricted to the real vocabulary (softmax over W[:V]), and their log-probs agree.
    `LoadedModel` sets it for every model it holds.
    """
    head = model.get_output_embeddings()
    rows = getattr(getattr(head, "weight", None), "shape", (0,))[0]
    if 0 < vocab_size < rows:
        setattr(model, _VOCAB_LIMIT_ATTR, int(vocab_size))


def vocab_limit(model: PreTrainedModel) -> int | None:
    """The token-id bound set by `limit_vocabulary`, or None (the head has no padded rows)."""
    return getattr(model, _VOCAB_LIMIT_ATTR, None)


def output_head(model: PreTrainedModel) -> torch.Tensor:
    """The [V, H] output projection (its first `vocab_limit` rows when the head is padded).
    Refuses heads this chunked path would get wrong."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embedding to score tokens with")
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(model).__name__}: an lm_head with a bias is not supported yet")
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(cfg, "final_logit_softcapping", None):
        raise ValueError(f"{type(model).__name__}: final logit soft-capping is not supported yet")
    limit = vocab_limit(model)
    return head.weight if limit is None else head.weight[:limit]


def base_model(model: PreTrainedModel) -> torch.nn.Module:
    return getattr(model, model.base_model_prefix)


PREFIX_SHARING_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def can_share_prefix(model: PreTrainedModel) -> bool:
    """Whether `response_hidden` may run a layout's shared prefix once for this model."""
    cfg = model.config
    if getattr(cfg, "model_type", None) not in PREFIX_SHARING_TYPES:
        return False
    if getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True):
        return False
    # transformers 5 renamed the flag; reading the old name only warns there.
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"
    return not (torch.is_grad_enabled() and getattr(model, flag, False))


def response_hidden(model: PreTrainedModel, layout: ResponseLayout,
                    extra_inputs: dict[str, Any] | None = None) -> torch.Tensor:
    """Final hidden states [N, H] at the positions that predict response tokens."""
    C = layout.prefix_len if not extra_inputs and can_share_prefix(model) else 0
    if C:
        return _hidden_with_shared_prefix(model, layout, C)
    out = base_model(model)(input_ids=layout.input_ids_BL, attention_mask=layout.attention_mask_BL,
                            use_cache=False, **(extra_inputs or {}))
    hidden_BLH = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden_BLH.reshape(-1, hidden_BLH.shape[-1]).index_select(0, layout.pred_index_N)


def _hidden_with_shared_prefix(model: PreTrainedModel, layout: ResponseLayout, C: int) -> torch.Tensor:
    from transformers import DynamicCache

    base = base_model(model)
    ids_BL = layout.input_ids_BL
    B, L = ids_BL.shape
    cache = DynamicCache()
    if not hasattr(cache, "layers"):  # a transformers without per-layer caches: no sharing
        return response_hidden(model, dataclasses.replace(layout, prefix_len=0))
    base(input_ids=ids_BL[:1, :C], use_cache=True, past_key_values=cache)
    for layer in cache.layers:  # one row's prefix keys/values, seen by all B rows (no copy)
        layer.keys = layer.keys.expand(B, -1, -1, -1)
        layer.values = layer.values.expand(B, -1, -1, -1)
    # Positions C..L-1 follow from the cache length; the mask covers prefix and rest.
    out = base(input_ids=ids_BL[:, C:], attention_mask=layout.attention_mask_BL, past_key_values=cache,
               use_cache=False)
    hidden_BRH = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    # A flat index b*L + p becomes b*(L-C) + (p-C); every predicting position is past the prefix.
    rest_index_N = layout.pred_index_N - C * (layout.row_N + 1)
    return hidden_BRH.reshape(-1, hidden_BRH.shape[-1]).index_select(0, rest_index_N)


def response_logprobs(model: PreTrainedModel, layout: ResponseLayout, *, chunk_size: int = 1024,
                      temperature: float = 1.0, extra_inputs: dict[str, Any] | None = None,
                      return_hidden: bool = False,
                      suppress_ids: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(y_t | x, y<t) for every response token, flat [N]; optionally the hidden [N, H].

    extra_inputs: further model inputs (a VLM's pixel values, token types, M-RoPE positions:
    `uniopd.models.multimodal.layout_inputs`). suppress_ids: tokens the rollout never samples;
    the log-probs are then those of the distribution restricted to the other tokens.
    """
    from uniopd.algo.losses.chunked import chunked_token_logprobs

    hidden_NH = response_hidden(model, layout, extra_inputs)
    logp_N = chunked_token_logprobs(hidden_NH, output_head(model), layout.target_ids_N,
                                    chunk_size=chunk_size, temperature=temperature)
    if suppress_ids:
        from uniopd.models.multimodal import restrict_logprobs

        logp_N = restrict_logprobs(logp_N, hidden_NH, output_head(model), layout.target_ids_N, suppress_ids,
                                   temperature)
    return logp_N, (hidden_NH if return_hidden else None)
