"""Version folders under external launchers: every rank of a torchrun or srun job writes to one folder."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

CLAIM = "from pathlib import Path; from pvt_lightning.runs.rundir import shared_version_dir; " \
        "print(shared_version_dir(Path({root!r})).name)"


def start_rank(root, rank: int, **env: str) -> subprocess.Popen:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_", "PVT_LIGHTNING_"))}
    return subprocess.Popen([sys.executable, "-c", CLAIM.format(root=str(root))], text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**clean, **env, "RANK": str(rank), "SLURM_PROCID": str(rank)})


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [{"TORCHELASTIC_RUN_ID": "job7"}, {"SLURM_JOB_ID": "4242"}])
def test_every_rank_of_a_launcher_job_gets_rank_zeros_folder(tmp_path, launcher):
    (tmp_path / "version_0").mkdir()  # an earlier run of the same name
    late = [start_rank(tmp_path, rank, **launcher) for rank in (1, 2)]  # ranks 1, 2 start before rank 0
    time.sleep(1.0)
    first = start_rank(tmp_path, 0, **launcher)
    names = [p.communicate(timeout=120)[0].strip() for p in [first, *late]]
    assert names == ["version_1"] * 3, [p.stderr.read() for p in [first, *late]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["version_0", "version_1"]
    again = start_rank(tmp_path, 0, **launcher)  # a requeued job (same id) continues in its folder
    assert again.communicate(timeout=120)[0].strip() == "version_1"


@pytest.mark.slow
def test_separate_jobs_get_separate_folders(tmp_path):
    one = start_rank(tmp_path, 0, TORCHELASTIC_RUN_ID="a")
    assert one.communicate(timeout=120)[0].strip() == "version_0"
    two = start_rank(tmp_path, 0, TORCHELASTIC_RUN_ID="b")
    assert two.communicate(timeout=120)[0].strip() == "version_1"
