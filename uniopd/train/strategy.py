"""The training-strategy seam: how many processes, how the student is wrapped, how gradients
and metrics are reduced, and who reads and writes checkpoints.

The loop (`uniopd.train.trainer`) asks the strategy for each of these and never branches on
the process layout itself. `trainer.strategy` picks one: `single` (one process, the model
as loaded) or `data_parallel` (`uniopd.train.distributed`), which implements the same methods:
`shard` gives each rank its share of a step's prompts, `reduce_sums` sums per-rank
statistics so the token-mean and metrics are those of the whole batch, `clip_grad_norm`
reduces the norm across shards, and only `is_main` writes checkpoints and logs.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from uniopd.config import ConfigError
from uniopd.models.weights import load_weights
from uniopd.train.checkpoint import checkpoint_format, find_resumable, load_trainer_state, save_checkpoint


class TrainingStrategy(ABC):
    rank: int = 0
    world_size: int = 1
    loss_scale: float = 1.0  # multiplies each loss before backward (undoes a gradient average)
    pads_micro_batches: bool = False  # every process must run the same number of micro-batches

    @property
    def is_main(self) -> bool:
        """This process writes checkpoints, metrics and logs."""
        return self.rank == 0

    @abstractmethod
    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The student as the update runs it (wrapped for sharding where the strategy shards)."""

    def shard(self, items: list) -> list:
        """This process's share of a step's prompts."""
        return items

    def reduce_sums(self, sums: dict[str, float]) -> dict[str, float]:
        """Sums over every process of per-process sums (token counts, loss sums, metric sums)."""
        return sums

    def reduce_max(self, value: float) -> float:
        """The largest value over every process (stop flags, loop counts)."""
        return value

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order."""
        return [obj]

    def barrier(self) -> None:
        """Wait for every process."""

    def full_weights(self, model: torch.nn.Module):
        """Context in which forwards need no collective (rollouts, evaluation)."""
        return contextlib.nullcontext()

    def shard_frozen(self, model: torch.nn.Module, key: str) -> torch.nn.Module:
        """A frozen model (a teacher) sharded across processes; `key` names the config choice."""
        raise ConfigError(f"{key}.shard=true needs trainer.strategy=data_parallel (one process has nothing to "
                          f"shard over)")

    def sync_gradients(self, model: torch.nn.Module) -> None:
        """Sum gradients across processes where the strategy replicates parameters."""

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm (inf: measure only); returns the norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def save(self, run_dir: Path, step: int, model: torch.nn.Module, tokenizer: Any, state: dict[str, Any], *,
             keep: int, optimizer: torch.optim.Optimizer | None = None) -> Path:
        """Write a checkpoint: the model, and `state` (holding the optimizer's state_dict)."""
        return save_checkpoint(run_dir, step, model, tokenizer, state, keep=keep)

    def load_latest(self, run_dir: Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> tuple[Path, dict[str, Any]] | None:
        """Load the newest verified checkpoint's weights into `model` (and its optimizer state
        into `optimizer`); (its path, trainer state)."""
        path = find_resumable(run_dir)
        if path is None:
            return None
        state = load_trainer_state(path)
        if checkpoint_format(path) == "sharded":  # written by a data-parallel run; read without a process group
            from uniopd.train.sharded_checkpoint import load_sharded

            load_sharded(path, model, optimizer, no_dist=True)
            return path, state
        load_weights(model, path)
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        return path, state

    def close(self) -> None:
        """Tear down what the strategy set up (process groups)."""


class SingleProcess(TrainingStrategy):
    """One process, the student as loaded, checkpoints written by this process."""

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model
