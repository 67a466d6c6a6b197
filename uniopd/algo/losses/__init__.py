"""OPD losses: the sampled-token PPO loss and the dense (full / top-k) family.

Pick by `loss.kind`: sampled (default), topk, full (KL in `loss.direction`), jsd
(generalized JSD with `loss.beta`), mix (`loss.forward_weight`·forward + rest·reverse).
"""

from uniopd.algo.losses.chunked import (
    DENSE_LOSSES,
    chunked_dense_loss,
    chunked_token_logprobs,
    dense_loss,
    iter_logit_chunks,
    resolve_dense_loss,
)
from uniopd.algo.losses.dense import forward_kl, generalized_jsd, mixed_kl, reduce_tokens, reverse_kl
from uniopd.algo.losses.sampled import ppo_clip_loss
from uniopd.algo.losses.topk import TOPK_DIRECTIONS, TOPK_SOURCES, topk_kl, topk_kl_from_teacher_topk

__all__ = [
    "DENSE_LOSSES", "TOPK_DIRECTIONS", "TOPK_SOURCES", "chunked_dense_loss", "chunked_token_logprobs",
    "dense_loss", "forward_kl", "generalized_jsd", "iter_logit_chunks", "mixed_kl", "ppo_clip_loss",
    "reduce_tokens", "resolve_dense_loss", "reverse_kl", "topk_kl", "topk_kl_from_teacher_topk",
]
