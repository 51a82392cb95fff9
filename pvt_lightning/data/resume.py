"""Exact mid-epoch resume: samplers whose order is fixed per epoch and whose position is part of their state.

torchdata's ``StatefulDataLoader`` (the training loader, loaders.py) saves the state of its sampler
with every batch it hands out, and Lightning writes the loader's state into each checkpoint (the fit
loop saves ``state_dict()`` of any train loader that has one). Resuming then restores the sampler at
the first batch not yet trained on. Two things make that exact:

- the order of an epoch depends only on (seed, epoch, rank, world size): a permutation seeded with
  ``seed + epoch``, never the global random state, so the resumed process draws the same order;
- the epoch is part of the state. Lightning builds the train loader's iterator (and its workers fetch
  their first indices) before it calls ``set_epoch`` for the resumed epoch, so a sampler that learnt
  its epoch only from ``set_epoch`` would replay epoch 0's order on a resume in a later epoch.
"""

from __future__ import annotations

from typing import Any, Iterator

from torch.utils.data import DistributedSampler


class ResumableEpoch:
    """Mixin for a ``DistributedSampler``: ``epoch_order()`` is this rank's indices for ``self.epoch``;
    ``state_dict()`` = {epoch, yielded}; after ``load_state_dict`` the next iteration starts where the
    saved one stopped."""

    _yielded = 0
    _resume_at = 0

    def epoch_order(self) -> list[int]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[int]:
        start, self._resume_at = self._resume_at, 0  # taken now: a later iter() starts a new epoch from 0
        self._yielded = start
        return self._walk(start)

    def _walk(self, start: int) -> Iterator[int]:
        for index in self.epoch_order()[start:]:
            self._yielded += 1
            yield index

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": int(self.epoch), "yielded": int(self._yielded)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self._resume_at = int(state["yielded"])


class ShuffleSampler(ResumableEpoch, DistributedSampler):
    """The training order: each epoch a permutation seeded with ``seed + epoch`` (``DistributedSampler``'s),
    this rank taking every ``num_replicas``-th index. Lightning keeps a ``DistributedSampler`` as it is
    under DDP, so the ranks split one permutation and together see each sample once per epoch (the
    last ``N mod world`` samples repeat on some ranks when N is not a multiple of the world size)."""

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)

    def epoch_order(self) -> list[int]:
        return list(DistributedSampler.__iter__(self))
