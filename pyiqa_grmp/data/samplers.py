"""Training samplers that can start an epoch part-way (exact resume) and give every item its own seed.

A sampler here yields ``(item_seed, key)`` pairs and :class:`SeededItems` reads them, so an item's random
transforms do not depend on which loader worker reads it or where the epoch started.

* :class:`ResumableSampler`: pyiqa's ``EnlargedSampler`` order (per rank, per epoch).
* :class:`TaskRoundSampler`: meta-training rounds: every task exactly once per round, source after source, the
  tasks of a source spread over the ranks (idle slots where they do not divide), item seeds that do not depend on
  the number of ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Tuple, Union

import numpy as np
import torch
from pyiqa.data.data_sampler import EnlargedSampler


def item_seed(*parts: int) -> int:
    """A 32-bit seed from integers (e.g. run seed, epoch, task), well mixed."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


@dataclass(frozen=True)
class IdleSlot:
    """A rank's turn with no task (the tasks of a source did not divide by the number of ranks)."""

    source: int


class ResumableSampler(EnlargedSampler):
    """pyiqa's ``EnlargedSampler`` (same order per epoch) that can start an epoch part-way and tags each index
    with a seed, so a resumed epoch yields exactly the remaining batches with their own randomness."""

    def __init__(self, dataset, num_replicas: int, rank: int, ratio: int, use_shuffle: bool, seed: int) -> None:
        super().__init__(dataset, num_replicas, rank, ratio, use_shuffle)
        self.seed, self.start = seed, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Epoch ``epoch``, skipping its first ``start`` items (already trained on before a resume)."""
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        indices = list(super().__iter__())
        for position in range(self.start, len(indices)):
            yield item_seed(self.seed, self.rank, self.epoch, position), indices[position]

    def __len__(self) -> int:
        return self.num_samples - self.start


class TaskRoundSampler(torch.utils.data.Sampler):
    """One meta-training round per epoch: for each source in order, its tasks in an order drawn from
    (seed, round, source), dealt to the ranks in turn and padded with :class:`IdleSlot` so that a source's tasks
    never share an iteration with another source's (its outer update comes after them on every rank). A task's
    seed comes from (seed, round, task), whatever the number of ranks."""

    def __init__(self, task_sources: List[int], num_replicas: int, rank: int, seed: int, shuffle: bool = True) -> None:
        self.task_sources, self.num_replicas, self.rank = list(task_sources), num_replicas, rank
        self.seed, self.shuffle, self.epoch, self.start = seed, shuffle, 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _slots(self) -> List[Union[int, IdleSlot]]:
        slots: List[Union[int, IdleSlot]] = []
        for source in sorted(set(self.task_sources)):
            tasks = [i for i, s in enumerate(self.task_sources) if s == source]
            if self.shuffle:
                order = np.random.default_rng(item_seed(self.seed, self.epoch, source)).permutation(len(tasks))
                tasks = [tasks[i] for i in order]
            padded = tasks + [IdleSlot(source)] * (-len(tasks) % self.num_replicas)
            slots += padded[self.rank::self.num_replicas]
        return slots

    def __iter__(self) -> Iterator[Tuple[int, Union[int, IdleSlot]]]:
        for slot in self._slots()[self.start:]:
            yield (0 if isinstance(slot, IdleSlot) else item_seed(self.seed, self.epoch, slot)), slot

    def __len__(self) -> int:
        return len(self._slots()) - self.start


class SeededItems(torch.utils.data.Dataset):
    """Reads ``(item_seed, key)`` pairs. In a loader worker the item's random transforms draw from generators
    seeded by ``item_seed`` (not from the worker's stream, which depends on where the epoch started); in the main
    process they draw from the training generators, which a training state restores. Dict items carry their
    ``item_seed`` (meta-training seeds each task's own randomness with it)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, Union[int, IdleSlot]]):
        seed, index = key
        if torch.utils.data.get_worker_info() is not None:
            import random

            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
        item = self.dataset[index]
        if isinstance(item, dict):
            item['item_seed'] = seed
        return item
