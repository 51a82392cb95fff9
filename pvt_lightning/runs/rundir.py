"""Run folders: versions claimed atomically, the run name, the checkpoint a resume continues, hparams and summary.

A run lives in ``<logdir>/<name>/version_N/``. ``claim_version`` creates the next free version
folder with ``mkdir`` (atomic), so two runs started together under one name get two folders.
Files are written through ``runs/io.py`` (atomic, never replacing the user's files unasked).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pvt_lightning.errors import UsageError
from pvt_lightning.models.registry import variant_label
from pvt_lightning.runs.io import write_file

VERSION = re.compile(r"version_(\d+)")
RUN_VERSION_ENV = "PVT_LIGHTNING_RUN_VERSION"
"""Set by the launching process before DDP workers start, so every rank writes to the same version folder."""


def versions(run_root: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in run_root.glob("version_*") if (m := VERSION.fullmatch(p.name)))


def claim_version(run_root: Path) -> Path:
    """Create and return the next free ``version_N`` folder; ``mkdir`` fails if another run took N, so retry."""
    run_root.mkdir(parents=True, exist_ok=True)
    number = max(versions(run_root), default=-1) + 1
    while True:
        folder = run_root / f"version_{number}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            number += 1


def shared_version_dir(run_root: Path) -> Path:
    """The version folder of this run: claimed by the launching process and inherited by the DDP workers it
    starts; under an external launcher (srun, torchrun) claimed by global rank 0 and found by the other ranks
    through a job marker, which also lets a requeued SLURM job (same job id) continue in its folder."""
    inherited = os.environ.get(RUN_VERSION_ENV)
    if inherited is not None:
        return run_root / f"version_{inherited}"
    job = launcher_job()
    folder = job_folder(run_root, job[0]) if job else None
    if folder is None and job and job[1] != 0:
        folder = wait_for_job_folder(run_root, job[0])
    if folder is None:
        folder = claim_version(run_root)
        if job:
            write_file(folder / JOB_FILE, job[0] + "\n")
    os.environ[RUN_VERSION_ENV] = VERSION.fullmatch(folder.name).group(1)
    return folder


JOB_FILE = ".slurm_job_id"
"""Marker of the launcher job that claimed a version folder (the name predates torchrun support)."""
JOB_WAIT_S = 1800.0


def launcher_job() -> tuple[str, int] | None:
    """(job id, global rank) when an external launcher started every process of the run, else None."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env and "RANK" in env:  # torchrun: one id for every rank of the job
        run_id = env["TORCHELASTIC_RUN_ID"]
        if run_id == "none":  # torchrun without --rdzv-id: the rendezvous address is shared by the job's ranks
            run_id = f"{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}"
        return f"torchrun-{run_id}", int(env["RANK"])
    if "SLURM_JOB_ID" in env:
        return env["SLURM_JOB_ID"], int(env.get("SLURM_PROCID", "0"))
    return None


def job_folder(run_root: Path, job: str) -> Path | None:
    """The version folder this launcher job claimed (before a requeue, or by its rank 0), if any."""
    for number in reversed(versions(run_root)):
        marker = run_root / f"version_{number}" / JOB_FILE
        if marker.is_file() and marker.read_text().strip() == job:
            return marker.parent
    return None


def wait_for_job_folder(run_root: Path, job: str, timeout: float = JOB_WAIT_S) -> Path:
    """A rank other than 0 waits for rank 0 to claim the job's folder (rank 0 also scans the data first)."""
    deadline = time.monotonic() + timeout
    while (folder := job_folder(run_root, job)) is None:
        if time.monotonic() > deadline:
            raise UsageError(f"rank 0 of launcher job {job} claimed no version folder under {run_root} within "
                             f"{timeout:.0f} s; check that every rank got the same --logdir and --name")
        time.sleep(0.2)
    return folder


def release_version_env() -> None:
    """After the run: a later run in this process (a notebook, a test) claims its own version."""
    os.environ.pop(RUN_VERSION_ENV, None)


def find_last_checkpoint(run_root: Path) -> Path:
    """Newest ``last.ckpt`` among a run's versions (``--resume last``)."""
    candidates = sorted(run_root.glob("version_*/checkpoints/last*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise UsageError(f"--resume last: no last.ckpt under {run_root}/version_*/checkpoints; check --logdir and "
                         "--name")
    return candidates[-1]


def version_dir_of(checkpoint: Path) -> Path | None:
    """``.../<name>/version_N`` for a checkpoint inside a run folder's ``checkpoints/``, else None."""
    folder = checkpoint.resolve().parent
    if folder.name == "checkpoints" and VERSION.fullmatch(folder.parent.name):
        return folder.parent
    return None


def remove_if_empty_run(folder: Path) -> None:
    """Remove a claimed version folder that holds nothing but what we wrote before the run failed to start."""
    leftovers = [p for p in folder.rglob("*") if p.is_file() and p.name not in ("hparams.yaml", JOB_FILE)]
    if not leftovers:
        shutil.rmtree(folder, ignore_errors=True)


# --- one run's folder ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunPaths:
    """Where a run writes: ``run_dir`` = ``<logdir>/<name>/version_N``; ``resume_from`` a checkpoint or None."""

    run_dir: Path
    resume_from: Path | None = None

    @property
    def name(self) -> str:
        return self.run_dir.parent.name

    @property
    def version(self) -> int:
        return int(VERSION.fullmatch(self.run_dir.name).group(1))

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"


def default_run_name(config: Any) -> str:
    """e.g. b2_li_384x224, b0_li_224x224 (b0 with linear SRA forced on), b2_noli_..., resnet50_384x224."""
    return f"{variant_label(config.variant, config.linear_sra)}_{config.img_size[0]}x{config.img_size[1]}"


def run_root_of(config: Any) -> Path:
    return Path(config.logdir).expanduser() / (config.name or default_run_name(config))


def resume_checkpoint(config: Any) -> Path | None:
    """The checkpoint ``--resume`` names: a path, or ``last`` = the newest last.ckpt of the run --name."""
    if config.resume is None:
        return None
    return find_last_checkpoint(run_root_of(config)) if config.resume == "last" else Path(config.resume).expanduser()


def open_run(config: Any) -> RunPaths:
    """The run's version folder: the one a resumed checkpoint lives in, else a newly claimed one."""
    run_root = run_root_of(config)
    resume_from = resume_checkpoint(config)
    if resume_from is None:
        return RunPaths(shared_version_dir(run_root))
    folder = version_dir_of(resume_from)
    if folder is None:  # a checkpoint from elsewhere: continue it in a new folder of this run
        return RunPaths(shared_version_dir(run_root), resume_from)
    os.environ[RUN_VERSION_ENV] = VERSION.fullmatch(folder.name).group(1)
    return RunPaths(folder, resume_from)


def write_hparams(paths: RunPaths, config_yaml: str) -> None:
    """``hparams.yaml``: the fully resolved configuration as YAML; ``--config hparams.yaml`` reruns it."""
    write_file(paths.run_dir / "hparams.yaml", config_yaml, overwrite=paths.resume_from is not None)


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """A run's summary.json, or None when it has none (not finished) or it cannot be read."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def write_summary(paths: RunPaths, summary: dict[str, Any]) -> None:
    write_file(paths.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n", overwrite=True)

