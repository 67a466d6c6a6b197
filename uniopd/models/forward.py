"""Forward passes that return what OPD needs and no more.

A [B, L, V] logits tensor is the largest object in a step (150k vocabulary × 4×512 tokens
is 1.2 GB in fp32). So we run the model's *base* (no lm_head), keep only the hidden states
at positions that predict response tokens (N of them, flattened), and apply the output
head chunk by chunk (`uniopd.algo.losses.chunked`). Teachers and students use the same
layout, so a teacher with a different prompt (its own view) lines up token for token.

Prompt tokens that several rows of a micro-batch share (a chat template's header; a whole
prompt for its n rollouts) are run once when the layout asks for it (`uniopd.models.prefix`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers import PreTrainedModel

from uniopd.models.prefix import PrefixPlan, can_share_prefix, hidden_with_prefix, plan_prefix


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
    prefix: PrefixPlan | None = None  # prompt prefixes run once (`uniopd.models.prefix`); None: every row whole

    def to_padded(self, values_N: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        out = values_N.new_full((self.num_rows, self.max_response), fill)
        out[self.row_N, self.col_N] = values_N
        return out

    def from_padded(self, values_BT: torch.Tensor) -> torch.Tensor:
        return values_BT[self.row_N, self.col_N]


def build_layout(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int,
                 device: torch.device | str = "cpu", *, share_prefix: bool = False) -> ResponseLayout:
    """share_prefix: plan which prompt prefixes `response_hidden` runs once (`plan_prefix`)."""
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
                          plan_prefix(prompt_ids, lengths) if share_prefix else None)


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


def max_positions(model: torch.nn.Module) -> int | None:
    """The positions the model was built for (its text model's, for a vision-language model)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def base_model(model: PreTrainedModel) -> torch.nn.Module:
    return getattr(model, model.base_model_prefix)


def response_hidden(model: PreTrainedModel, layout: ResponseLayout,
                    extra_inputs: dict[str, Any] | None = None) -> torch.Tensor:
    """Final hidden states [N, H] at the positions that predict response tokens."""
    if layout.prefix is not None and not extra_inputs and can_share_prefix(model):
        return _hidden_with_shared_prefix(model, layout)
    out = base_model(model)(input_ids=layout.input_ids_BL, attention_mask=layout.attention_mask_BL,
                            use_cache=False, **(extra_inputs or {}))
    hidden_BLH = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden_BLH.reshape(-1, hidden_BLH.shape[-1]).index_select(0, layout.pred_index_N)


def _hidden_with_shared_prefix(model: PreTrainedModel, layout: ResponseLayout) -> torch.Tensor:
    lengths = layout.attention_mask_BL.sum(-1).tolist()
    hidden_BRH = hidden_with_prefix(base_model(model), layout.input_ids_BL, lengths, layout.prefix)
    if hidden_BRH is None:  # a transformers without per-layer caches: every row whole
        return response_hidden(model, dataclasses.replace(layout, prefix=None))
    # Row b's position p sits at b*R + p - offset_b in the flattened rest.
    L, R = layout.input_ids_BL.shape[1], hidden_BRH.shape[1]
    off_N = torch.tensor(layout.prefix.offsets(), device=layout.row_N.device)[layout.row_N]
    rest_index_N = layout.pred_index_N - layout.row_N * (L - R) - off_N
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
