"""Which examples each optimizer step sees: a pure function of (seed, dataset size, step).

Every epoch is a seeded permutation of the dataset; the epochs are laid end to end and
cut into batches. Because step ``s`` always gets the same examples, a resumed run
continues exactly where its checkpoint left off: no example lost, none repeated.
A partial batch at the very end is dropped (with ``epochs`` x ``num_examples`` not a
multiple of the batch size, the last few examples of the last epoch are not seen), and
a batch that straddles two epochs can hold the same example twice, once from each.
"""

from __future__ import annotations

import torch


class BatchSchedule:
    def __init__(self, num_examples: int, batch_size: int, epochs: int, seed: int):
        if num_examples < 1:
            raise ValueError("num_examples must be >= 1 (the dataset is empty)")
        if batch_size > num_examples * epochs:
            raise ValueError(f"batch_size {batch_size} exceeds the {num_examples * epochs} "
                             "examples of all epochs together")
        self.num_examples, self.batch_size = num_examples, batch_size
        self.epochs, self.seed = epochs, seed
        self.total_steps = num_examples * epochs // batch_size
        self._orders: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders[epoch] = torch.randperm(self.num_examples, generator=gen)
        return self._orders[epoch]

    def batch(self, step: int) -> list[int]:
        """Dataset indices of optimizer step ``step`` (0-based)."""
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} outside [0, {self.total_steps})")
        start = step * self.batch_size
        out = []
        for pos in range(start, start + self.batch_size):
            epoch, offset = divmod(pos, self.num_examples)
            out.append(int(self._order(epoch)[offset]))
        return out


class PromptStream:
    """Prompt indices in training order: ``episodes`` seeded permutations end to end.

    The same stream a :class:`BatchSchedule` with batch size 1 walks, so position ``p``
    is a pure function of (seed, number of prompts, ``p``). Sim-RL's dynamic filtering
    consumes a variable number of positions per step; its checkpoint stores where it
    stopped.
    """

    def __init__(self, num_prompts: int, episodes: int, seed: int):
        self._schedule = BatchSchedule(num_prompts, 1, episodes, seed)

    def __len__(self) -> int:
        return self._schedule.total_steps

    def take(self, position: int, count: int) -> list[int]:
        """Up to ``count`` indices from ``position`` on (fewer at the end of the stream)."""
        stop = min(position + count, len(self))
        return [self._schedule.batch(p)[0] for p in range(position, stop)]
