"""Deterministic prompt sampler whose whole state is (epoch, position).

Each epoch is a permutation drawn from `seed + epoch`, so a run resumed from a checkpoint
sees exactly the prompts the uninterrupted run would have seen.
"""

from __future__ import annotations

import random
from typing import Generic, TypeVar

T = TypeVar("T")


class PromptSampler(Generic[T]):
    def __init__(self, items: list[T], *, seed: int = 0, shuffle: bool = True):
        if not items:
            raise ValueError("the prompt set is empty")
        self.items, self.seed, self.shuffle = items, seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.items)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next(self, k: int) -> list[T]:
        out = []
        while len(out) < k:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            out.append(self.items[self._order[self.position]])
            self.position += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "size": len(self.items)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("size") != len(self.items):
            raise ValueError(f"checkpoint was taken on {state.get('size')} prompts, the data now has "
                             f"{len(self.items)}: resume needs the same prompt file")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
