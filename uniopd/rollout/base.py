"""The rollout-engine seam: what every generation backend does, and the registry that picks one.

An engine samples n responses per prompt and returns each response's token ids with the
log-probs of the sampled tokens under the distribution they were drawn from (logits /
temperature, before top-p): the PPO "old" log-probs and the student side of the token
advantage. After every optimizer step the trainer calls `update_weights` so the next step
samples from the new policy.

`rollout.backend` picks the engine by name (`hf`) or by dotted path
(`mypkg.engines:MyEngine`, a subclass of `RolloutEngine` with the same constructor).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from uniopd.batch import Sample
from uniopd.config import ConfigError, RolloutConfig
from uniopd.data.prompts import PromptLimit
from uniopd.models.loading import LoadedModel
from uniopd.registry import resolve

ROLLOUT_ENGINES: dict[str, str] = {
    "hf": "uniopd.rollout.hf:HFEngine",
    "vllm": "uniopd.rollout.vllm:VLLMEngine",
    "replay": "uniopd.rollout.replay:ReplayEngine",
}


@dataclass(frozen=True)
class EngineSupport:
    """What an engine can do, known before it is built (checked at start-up)."""

    images: bool = False  # prompts with images (vision-language students)
    # "shared": samples from the trainer's own module, so updates are seen at once;
    # "push": holds its own copy of the weights, refreshed by update_weights().
    weight_sync: str = "shared"
    # True: the sampled tokens' log-probs are the trainer's own computation (PPO ratio starts at
    # 1 as is); False: another implementation's (vLLM kernels), so the trainer recomputes them.
    trainer_logprobs: bool = True
    options: frozenset[str] = frozenset()  # the engine-specific `rollout.vllm_*` keys it reads
    # Runs as one engine per process under trainer.strategy=data_parallel (False: refused at start-up).
    data_parallel: bool = True


class RolloutEngine(ABC):
    """Samples responses from the student. Subclasses keep this constructor signature.

    cfg: the rollout config; student: the trainer's student (model, tokenizer, processor);
    suppress_ids: token ids never to sample (a vision-language model's image placeholders).
    """

    support: ClassVar[EngineSupport] = EngineSupport()
    # True: one engine spans several processes, so every process of it calls `sample` together
    # and equally often (an empty prompt list included); the caller must not skip a call.
    collective: bool = False

    def __init__(self, cfg: RolloutConfig, student: LoadedModel, *, suppress_ids: list[int] | None = None):
        self.cfg = cfg
        self.student = student
        self.suppress_ids = list(suppress_ids or [])

    @abstractmethod
    def sample(self, prompts: list[list[int]], n: int, *, multimodal: list | None = None, greedy: bool = False,
               generator: torch.Generator | None = None) -> list[list[Sample]]:
        """n samples per prompt (token ids), as one list per prompt (the group), in prompt order.

        multimodal: one `MultimodalInputs` (or None) per prompt for vision-language students;
        greedy: argmax decoding (evaluation); generator: the caller's seeded random stream.
        """

    @classmethod
    def check_config(cls, cfg: RolloutConfig, key: str = "rollout") -> None:
        """Before any model loads: refuse what this engine cannot do (named by its dotted key)."""
        for f in dataclasses.fields(cfg):
            if (f.name.startswith("vllm_") and getattr(cfg, f.name) != f.default
                    and f.name not in cls.support.options):
                raise ConfigError(f"{key}.{f.name}={getattr(cfg, f.name)!r} is a vLLM engine setting, but "
                                  f"{key}.backend={cfg.backend!r} does not read it; set {key}.backend=vllm "
                                  f"or remove the key")

    def prompt_limit(self, max_prompt_tokens: int) -> PromptLimit:
        """The longest prompt this engine takes: model.max_prompt_tokens, unless the engine has less
        room (callers hand it to `prepare_prompts`, so `data.overlong` handles what does not fit)."""
        return PromptLimit(max_prompt_tokens, f"model.max_prompt_tokens={max_prompt_tokens}")

    def update_weights(self, model: torch.nn.Module) -> None:
        """Make the next `sample` use `model`'s current weights (called after each optimizer step)."""

    def close(self) -> None:
        """Release what the engine holds (processes, memory)."""


def positions_limit(max_prompt_tokens: int, max_len: int, max_new_tokens: int, where: str,
                    engine: str = "the engine") -> PromptLimit:
    """min(model.max_prompt_tokens, max_len - rollout.max_new_tokens): a prompt and its longest
    response must fit the positions the engine has (`where` names them in every message)."""
    room = max_len - max_new_tokens
    if room < 1:
        raise ConfigError(f"{where} leaves no room for a prompt after rollout.max_new_tokens={max_new_tokens}; "
                          f"lower rollout.max_new_tokens")
    if room >= max_prompt_tokens:
        return PromptLimit(max_prompt_tokens, f"model.max_prompt_tokens={max_prompt_tokens}")
    return PromptLimit(room, f"the {room} tokens {engine} has for a prompt ({where} - "
                             f"rollout.max_new_tokens={max_new_tokens}; model.max_prompt_tokens={max_prompt_tokens})")


class EngineFailed(RuntimeError):
    """The rollout engine failed mid-run (crashed, died, lost its device): the run cannot go on with it."""


def engine_class(backend: str, key: str = "rollout.backend") -> type[RolloutEngine]:
    return resolve(key, backend, ROLLOUT_ENGINES, base=RolloutEngine)


def checked_engine_class(cfg: RolloutConfig, key: str = "rollout.backend") -> type[RolloutEngine]:
    """The engine class `cfg.backend` names, after its own start-up checks of `cfg`."""
    cls = engine_class(cfg.backend, key)
    cls.check_config(cfg, key.rsplit(".", 1)[0])
    return cls


def build_rollout_engine(cfg: RolloutConfig, student: LoadedModel, *, suppress_ids: list[int] | None = None,
                         key: str = "rollout.backend") -> RolloutEngine:
    cls = checked_engine_class(cfg, key)
    if student.is_multimodal and not cls.support.images:
        raise ConfigError(f"{key}={cfg.backend!r} cannot sample from vision-language students "
                          f"({student.source}); use hf")
    return cls(cfg, student, suppress_ids=suppress_ids)
