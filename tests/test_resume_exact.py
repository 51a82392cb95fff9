"""Exact mid-epoch resume: a run stopped after its step-k checkpoint and resumed trains on every remaining
sample of that epoch once and on none twice, in the order an uninterrupted run would have (folders and
manifests; in-process loading, loader workers, and 2-process CPU DDP)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from resume_worker import make_id_dataset, run_phase, seen

REPO = Path(__file__).resolve().parents[1]
SAMPLES = list(range(48))  # 3 classes x 16 ids; batch 4: 12 steps an epoch (6 per rank under 2-process DDP)


def source(root: Path, kind: str) -> Path:
    return root / "train.csv" if kind == "manifest" else root


def test_every_epoch_sees_each_sample_once_in_a_seeded_order(tmp_path):
    data = make_id_dataset(tmp_path / "data")
    run_phase(data, tmp_path / "full", epochs=2)
    again = tmp_path / "again"
    run_phase(data, again, epochs=2)
    orders = seen(tmp_path / "full")
    assert sorted(orders[0]) == sorted(orders[1]) == SAMPLES
    assert orders[0] != orders[1]  # reshuffled each epoch
    assert seen(again) == orders  # and the same order for the same seed


@pytest.mark.parametrize("kind, workers, stop, sampler", [
    ("folder", 0, 5, "none"),  # stopped in epoch 0, loading in-process
    ("manifest", 2, 17, "none"),  # stopped in epoch 1 after 5 of its 12 steps, loader worker processes
    ("folder", 0, 7, "balanced"),  # class-rebalanced draws (with replacement) resume the same way
])
def test_resume_mid_epoch_continues_the_epoch_exactly(tmp_path, kind, workers, stop, sampler):
    data = source(make_id_dataset(tmp_path / "data"), kind)
    run_phase(data, tmp_path / "full", epochs=2, workers=workers, sampler=sampler)
    last = run_phase(data, tmp_path / "runs" / "a", epochs=2, max_steps=stop, checkpoint_every=stop,
                     workers=workers, sampler=sampler)
    assert last.is_file()
    run_phase(data, tmp_path / "runs" / "b", epochs=2, resume=last, workers=workers, sampler=sampler)
    resumed, full = seen(tmp_path / "runs"), seen(tmp_path / "full")
    assert resumed == full  # the same samples in the same order as without the interruption
    if sampler == "none":
        assert all(sorted(ids) == SAMPLES for ids in resumed.values())


def test_resuming_with_another_worker_count_is_a_clear_error(tmp_path):
    from pvt_lightning.errors import DataError

    data = make_id_dataset(tmp_path / "data")
    last = run_phase(data, tmp_path / "a", epochs=1, max_steps=3, checkpoint_every=3, workers=0)
    with pytest.raises(DataError, match=r"saved with 0 loader worker\(s\), this run has 2; resume with "
                                        r"--num-workers 0"):
        run_phase(data, tmp_path / "b", epochs=1, resume=last, workers=2)


def ddp_phase(tmp_path: Path, name: str, **kwargs) -> None:
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps({key: str(value) if isinstance(value, Path) else value
                                  for key, value in kwargs.items()}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "resume_worker.py"), "--config", str(config)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("kind, stop", [("folder", 9), ("manifest", 4)])
def test_ddp_two_processes_split_each_epoch_and_resume_exactly(tmp_path, kind, stop):
    """gloo DDP on 2 CPU processes: the ranks share each epoch without overlap, and a resume after the
    step-``stop`` checkpoint (6 steps an epoch per rank) completes it with no sample missing or repeated."""
    data = source(make_id_dataset(tmp_path / "data"), kind)
    runs = tmp_path / "runs"
    ddp_phase(tmp_path, "a", data=data, out=runs / "a", epochs=2, max_steps=stop, checkpoint_every=stop, devices=2)
    ddp_phase(tmp_path, "b", data=data, out=runs / "b", epochs=2, resume=runs / "a" / "checkpoints" / "last.ckpt",
              devices=2)
    per_epoch = seen(runs)
    assert sorted(per_epoch) == [0, 1]
    assert all(sorted(ids) == SAMPLES for ids in per_epoch.values())
    halves = [{int(line.split(",")[2]) for line in (runs / "a" / f"seen_rank{rank}.csv").read_text().splitlines()
               if line.startswith("0,")} for rank in (0, 1)]
    assert halves[0] and halves[1] and not halves[0] & halves[1]  # in epoch 0 the ranks drew disjoint halves
