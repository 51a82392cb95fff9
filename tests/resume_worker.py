"""One training phase that records which samples it trained on: imported by test_resume_exact.py, and run
as a script for the DDP tests (Lightning's DDP launcher starts this script again for rank 1).

Each image of the generated datasets is one flat colour whose red value is 5 x its id, a PNG (lossless):
the id survives the real pipeline (decode, random resized crop, flip, normalisation), so the model reads
the ids off the batches it trains on; nothing in the data module is wrapped or replaced.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import torch

from pvt_lightning.data import ImageFolderDataModule
from pvt_lightning.data.datamodule import IMAGENET_MEAN, IMAGENET_STD

ID_STEP = 5


def make_id_dataset(root: Path, classes: int = 3, per_class: int = 16) -> Path:
    """root/train/c<k>/<id>.png (ids 0..classes*per_class-1), root/val/c<k>/ one image each, root/train.csv
    and root/val.csv listing the same files."""
    rows = {"train": [], "val": []}
    for sample in range(classes * per_class):
        label = sample % classes
        for split in ("train", "val") if sample < classes else ("train",):
            path = root / split / f"c{label}" / f"{sample:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            colour = np.array([128, 128, ID_STEP * sample], np.uint8)  # BGR for OpenCV: red = id x 5
            cv2.imwrite(str(path), np.broadcast_to(colour, (12, 12, 3)).copy())
            rows[split].append((path.relative_to(root).as_posix(), f"c{label}"))
    for split, split_rows in rows.items():
        with open(root / f"{split}.csv", "w", newline="") as handle:
            csv.writer(handle).writerows([("path", "label"), *split_rows])
    return root


class IdRecorder(L.LightningModule):
    """A linear head on pooled pixels; every training step appends ``epoch,rank,id`` rows to ``out/seen.csv``
    (one file per rank: ``seen_rank<r>.csv``)."""

    def __init__(self, out: Path, num_classes: int = 3) -> None:
        super().__init__()
        self.out = Path(out)
        self.head = torch.nn.Linear(3, num_classes)

    def training_step(self, batch, batch_idx):
        images, targets = batch
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
        red = (images * std + mean)[:, 0].mean(dim=(1, 2))
        ids = torch.round(red / ID_STEP).long().tolist()
        with open(self.out / f"seen_rank{self.global_rank}.csv", "a") as handle:
            handle.writelines(f"{self.current_epoch},{self.global_rank},{i}\n" for i in ids)
        return torch.nn.functional.cross_entropy(self.head(images.mean(dim=(2, 3))), targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def run_phase(data: Path, out: Path, epochs: int, max_steps: int = -1, checkpoint_every: int = 0,
              resume: Path | None = None, devices: int = 1, workers: int = 0, sampler: str = "none") -> Path:
    """Train (or resume) with the run's own checkpoint callbacks (LastCheckpointSaver every N steps, as
    ``--checkpoint-every-steps N``); returns the path of last.ckpt."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from pvt_lightning.training.reliability import LastCheckpointSaver

    out.mkdir(parents=True, exist_ok=True)
    checkpoint = ModelCheckpoint(dirpath=out / "checkpoints", save_top_k=0, save_last=False)
    saver = LastCheckpointSaver(checkpoint, every_n_steps=checkpoint_every, every_minutes=0)
    dm = ImageFolderDataModule(data, img_size=(16, 16), batch_size=4, num_workers=workers, seed=11,
                               sampler=sampler, index_cache=out / "index_cache")
    trainer = L.Trainer(max_epochs=epochs, max_steps=max_steps, accelerator="cpu", devices=devices,
                        strategy="ddp" if devices > 1 else "auto", logger=False, callbacks=[checkpoint, saver],
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    trainer.fit(IdRecorder(out), datamodule=dm, ckpt_path=str(resume) if resume else None)
    return Path(saver.path)


def seen(out: Path) -> dict[int, list[int]]:
    """{epoch: ids trained on, over every rank} from the phase folders' ``seen_rank*.csv`` files."""
    per_epoch: dict[int, list[int]] = {}
    for file in sorted(out.rglob("seen_rank*.csv")):
        with open(file) as handle:
            for epoch, _rank, sample in csv.reader(handle):
                per_epoch.setdefault(int(epoch), []).append(int(sample))
    return per_epoch


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True, help="JSON of run_phase's keyword arguments")
    kwargs = json.loads(Path(parser.parse_args().config).read_text())
    for key in ("data", "out", "resume"):
        if kwargs.get(key):
            kwargs[key] = Path(kwargs[key])
    np.seterr(all="ignore")
    run_phase(**kwargs)
