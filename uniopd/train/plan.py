"""Start-up checks that need no model: does each chosen backend give the loss and the
diagnostics what they need?

Every teacher scorer declares what it returns from its config alone
(`TeacherScorer.outputs`); every loss kind declares which teacher outputs it can run from
(`LossKind.teacher_outputs`, alternatives). For each teacher the plan picks the first
alternative the scorer provides and adds hidden states when diagnostics are on and the
scorer has them. A combination that cannot work fails here, before any model loads, with a
message naming the keys; diagnostics a scorer cannot feed are turned off for its rows with
one log line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from uniopd.algo.losses.registry import loss_kind
from uniopd.batch import HIDDEN, TOPK
from uniopd.config import ConfigError, RunConfig
from uniopd.rollout.base import checked_engine_class, engine_class
from uniopd.teachers.base import scorer_class

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherPlan:
    want: dict[str, frozenset[str]]  # per teacher: what `score` returns every step
    diagnostics: dict[str, bool]  # per teacher: token diagnostics (top-k overlap, entropies, ...) on its rows

    def needs_hidden(self, name: str) -> bool:
        return HIDDEN in self.want[name]


def _describe(outputs: frozenset[str]) -> str:
    return " + ".join(sorted(outputs))


def _check_engine_shards(cfg: RunConfig) -> None:
    """A vLLM student engine sharded over processes (tensor parallelism) takes the trainer's processes."""
    tp = cfg.rollout.vllm_tensor_parallel_size or 1
    if tp == 1:
        return
    key = f"rollout.vllm_tensor_parallel_size={tp}"
    if cfg.trainer.strategy != "data_parallel":
        raise ConfigError(f"{key} shards the engine over the trainer's processes: use trainer.strategy=data_parallel "
                          f"with a multiple of {tp} processes (uniopd train --nproc N)")
    in_process = sorted(name for name, tcfg in cfg.teachers.items() if tcfg.backend == "vllm")
    if in_process:
        raise ConfigError(f"{key} with teachers.{in_process[0]}.backend=vllm: a process holds one vLLM parallel "
                          f"layout, and the in-process teacher's engine is not sharded; serve the teacher "
                          f"(teachers.{in_process[0]}.backend=remote, uniopd serve-teacher) or use backend=local")


def plan_teachers(cfg: RunConfig) -> TeacherPlan:
    """Check every teacher's scorer against `loss.kind` and `logging.diagnostics`."""
    engine = engine_class(cfg.rollout.backend)
    if cfg.trainer.strategy == "data_parallel" and not engine.support.data_parallel:
        raise ConfigError(f"rollout.backend={cfg.rollout.backend!r} with trainer.strategy=data_parallel (or "
                          f"uniopd train --nproc > 1) is not supported: the engine runs in one process only; use "
                          f"rollout.backend=hf or vllm for data-parallel runs, or trainer.strategy=single")
    _check_engine_shards(cfg)
    checked_engine_class(cfg.rollout)  # an unknown or misconfigured engine fails here too, before any model loads
    kind = loss_kind(cfg.loss.kind)
    alternatives = kind.teacher_outputs(cfg.loss)
    want: dict[str, frozenset[str]] = {}
    diagnostics: dict[str, bool] = {}
    for name, tcfg in cfg.teachers.items():
        key = f"teachers.{name}"
        scorer = scorer_class(name, tcfg)
        scorer.check_config(tcfg, key)
        if tcfg.shard and cfg.trainer.strategy != "data_parallel":
            raise ConfigError(f"{key}.shard=true needs trainer.strategy=data_parallel (torchrun or uniopd train "
                              f"--nproc N): one process has nothing to shard over")
        has = scorer.outputs(tcfg)
        how = f"{key}.backend={tcfg.backend!r}" + (f" with {key}.top_k={tcfg.top_k}" if tcfg.top_k else "")
        choice = next((alt for alt in alternatives if alt <= has), None)
        if choice is None:
            needed = " or ".join(_describe(a) for a in alternatives)
            raise ConfigError(f"loss.kind={cfg.loss.kind!r} needs the teacher's {needed}, but {how} returns "
                              f"{_describe(has)}; use loss.kind=sampled"
                              + (" or loss.kind=topk with loss.topk_source=teacher" if TOPK in has else "")
                              + " for this teacher")
        if TOPK in choice and HIDDEN not in choice:
            if cfg.loss.topk > tcfg.top_k:
                raise ConfigError(f"loss.topk={cfg.loss.topk} is more than the {tcfg.top_k} tokens {how} returns; "
                                  f"lower loss.topk or raise {key}.top_k")
            if cfg.loss.temperature != 1.0:
                raise ConfigError(f"loss.temperature={cfg.loss.temperature}: {how} returns log-probs at "
                                  f"temperature 1 only; set loss.temperature=1")
        wanted = set(choice)
        diagnostics[name] = cfg.logging.diagnostics and HIDDEN in has
        if diagnostics[name]:
            wanted.add(HIDDEN)
        elif cfg.logging.diagnostics:
            log.info("logging.diagnostics: %s returns no hidden states, so top-k overlap, shared mass, entropies "
                     "and full reverse KL are off for its rows (the log-ratio histogram stays)", how)
        want[name] = frozenset(wanted)
    return TeacherPlan(want, diagnostics)
