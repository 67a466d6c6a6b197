"""The loss registry: every `loss.kind` is one entry, and the config's choices come from here.

An entry says which dense term it adds to the sampled-token PPO term (if any) with which
options, and which teacher outputs that needs (any one of several alternatives), so a run
can check a teacher backend against the loss before any model loads. A new loss kind is one
dense function in `DENSE_LOSSES` plus one `register_loss` call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uniopd.batch import HIDDEN, LOGP, TOPK

__all__ = ["LOSS_KINDS", "LossKind", "loss_kind", "register_loss"]


@dataclass(frozen=True)
class LossKind:
    """name: the `loss.kind` value; help: one line for `uniopd config`.
    dense(loss_cfg) -> (DENSE_LOSSES name, keyword options) of the dense term, or None for a
    loss that is the sampled-token PPO term alone.
    teacher_outputs(loss_cfg) -> alternatives, each a set of teacher outputs that suffices."""

    name: str
    help: str
    dense: Callable[[Any], tuple[str, dict[str, Any]]] | None
    teacher_outputs: Callable[[Any], tuple[frozenset[str], ...]]

    @property
    def is_dense(self) -> bool:
        return self.dense is not None


LOSS_KINDS: dict[str, LossKind] = {}


def register_loss(kind: LossKind) -> LossKind:
    LOSS_KINDS[kind.name] = kind
    return kind


def loss_kind(name: str) -> LossKind:
    try:
        return LOSS_KINDS[name]
    except KeyError:
        raise ValueError(f"unknown loss.kind {name!r}; expected one of {', '.join(LOSS_KINDS)}") from None


_HIDDEN = (frozenset({LOGP, HIDDEN}),)

register_loss(LossKind(
    "sampled", "PPO-clipped policy gradient with token advantage log πT − log πS on the sampled token",
    dense=None, teacher_outputs=lambda cfg: (frozenset({LOGP}),)))
register_loss(LossKind(
    "topk", "KL over a top-k token set (loss.topk_source); teacher-side top-k also runs from top-k-only teachers",
    dense=lambda cfg: ("topk", {"k": cfg.topk, "source": cfg.topk_source, "renormalize": cfg.topk_renormalize,
                                "tail": cfg.topk_tail, "direction": cfg.direction, "temperature": cfg.temperature}),
    teacher_outputs=lambda cfg: _HIDDEN + ((frozenset({LOGP, TOPK}),) if cfg.topk_source == "teacher" else ())))
register_loss(LossKind(
    "full", "full-vocabulary KL in loss.direction (reverse KL(S||T) or forward KL(T||S))",
    dense=lambda cfg: ("full_reverse" if cfg.direction == "reverse" else "full_forward",
                       {"temperature": cfg.temperature}),
    teacher_outputs=lambda cfg: _HIDDEN))
register_loss(LossKind(
    "jsd", "generalized JSD with loss.beta (0 = KL(T||S), 1 = KL(S||T))",
    dense=lambda cfg: ("jsd", {"beta": cfg.beta, "temperature": cfg.temperature}),
    teacher_outputs=lambda cfg: _HIDDEN))
register_loss(LossKind(
    "mix", "loss.forward_weight * KL(T||S) + (1 - forward_weight) * KL(S||T)",
    dense=lambda cfg: ("mix", {"forward_weight": cfg.forward_weight, "temperature": cfg.temperature}),
    teacher_outputs=lambda cfg: _HIDDEN))
