"""DataLoaders of the data module: a resumable (stateful) training loader, plain evaluation loaders."""

from __future__ import annotations

import warnings
from typing import Any, Callable

from torch.utils.data import DataLoader, Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from pvt_lightning.data.dataset import worker_init
from pvt_lightning.errors import DataError


class ResumableLoader(StatefulDataLoader):
    """torchdata's ``StatefulDataLoader``: Lightning saves its ``state_dict()`` in every checkpoint and loads
    it on ``--resume``, so a resumed epoch goes on from the first batch not yet trained on (resume.py).

    A saved state can only be replayed with the same number of loader workers; another count is a
    ``DataError`` saying which one to use, instead of torchdata's assertion.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = saved_worker_count(state_dict)
        if saved is not None and saved != self.num_workers:
            raise DataError(f"the checkpoint's training-loader position was saved with {saved} loader worker(s), "
                            f"this run has {self.num_workers}; resume with --num-workers {saved} to continue the "
                            "epoch exactly where it stopped")
        super().load_state_dict(state_dict)


def saved_worker_count(state: dict[str, Any]) -> int | None:
    """Loader workers of a saved StatefulDataLoader state (0: in-process loading), None if unknown."""
    if not isinstance(state, dict) or not state:
        return None
    snapshot = state.get("_snapshot")
    if isinstance(snapshot, dict):
        return snapshot.get("_main_snapshot", {}).get("_num_workers")
    return 0 if "_num_yielded" in state else None


def build_loader(dataset: Dataset, batch_size: int, num_workers: int, pin_memory: bool, collate: Callable,
                 sampler: Sampler | None = None, train: bool = False) -> DataLoader:
    """Training (``train``): a ResumableLoader over ``sampler``, dropping a last partial batch; evaluation:
    a DataLoader in order, keeping every sample."""
    loader = ResumableLoader if train else DataLoader
    with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated in torch 2.14: not ours to fix
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        return loader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=train and len(dataset) > batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
            worker_init_fn=worker_init,
            collate_fn=collate,
        )
