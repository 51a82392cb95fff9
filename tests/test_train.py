"""The main job end to end: experiments/run.py trains, evaluates, predicts and resumes for real."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.slow  # end to end through experiments/run.py in subprocesses; test_entry_points.py is the fast tier

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "experiments" / "run.py")]
CLASSES = ("cat", "dog", "fox")
QUICK = ["--variant", "b0", "--img-size", "32", "32", "--batch-size", "4", "--num-workers", "0",
         "--limit-train-batches", "3", "--precision", "32", "--accelerator", "cpu"]
SUMMARY_FIELDS = {"variant", "linear_sra", "img_size", "num_classes", "class_names", "params_m", "gmacs", "epochs",
                  "global_step", "metrics", "best", "epoch_time_s", "peak_memory_mb", "memory_device",
                  "throughput_img_s", "bad_images", "checkpoints"}


def run_cli(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*RUN, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"run.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from conftest import make_image_folder

    root = tmp_path_factory.mktemp("train")
    make_image_folder(root / "data", classes=CLASSES, per_class=6, size=(40, 48))
    return root


@pytest.fixture(scope="module")
def trained_run(workspace):
    proc = run_cli(*QUICK, "--data", "data", "--epochs", "2", "--logdir", "runs", "--name", "tiny", cwd=workspace)
    run_dir = workspace / "runs" / "tiny" / "version_0"
    return proc, run_dir


def test_run_writes_a_complete_run_directory(trained_run):
    proc, run_dir = trained_run
    last_line = proc.stdout.strip().splitlines()[-1]
    assert str(Path("runs") / "tiny" / "version_0") in last_line and "val/acc" in last_line
    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_FIELDS <= summary.keys()
    assert summary["variant"] == "b0" and summary["linear_sra"] is False
    assert summary["img_size"] == [32, 32] and summary["class_names"] == list(CLASSES)
    assert summary["epochs"] == 2 and summary["global_step"] == 6  # 2 epochs x 3 limited batches
    assert set(summary["metrics"]) == {"val/acc", "val/acc5", "val/precision", "val/recall", "val/f1", "val/loss",
                                       "val/ap", "val/recall@precision0.90"}  # --report-precision's default
    assert summary["validation_curves"]["method"] == "exact" and summary["validation_curves"]["images"] == 18
    assert summary["inference"]["batch_size"] == 4 and summary["inference"]["img_size"] == [32, 32]
    assert 0 <= summary["metrics"]["val/acc"] <= 1 and summary["bad_images"] == 0
    assert summary["epoch_time_s"] > 0 and summary["peak_memory_mb"] > 0 and summary["memory_device"] == "cpu"
    for kind in ("best", "last"):
        assert Path(summary["checkpoints"][kind]).is_file()
    assert list(run_dir.glob("events.out.tfevents.*"))
    hparams = yaml.safe_load((run_dir / "hparams.yaml").read_text())
    assert hparams["variant"] == "b0" and hparams["img-size"] == [32, 32]
    # Class names travel with the model.
    ckpt = torch.load(summary["checkpoints"]["last"], map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["class_names"] == list(CLASSES)


def test_a_second_run_never_overwrites_the_first(trained_run, workspace):
    _, first = trained_run
    before = (first / "summary.json").read_text()
    run_cli(*QUICK, "--data", "data", "--epochs", "1", "--logdir", "runs", "--name", "tiny", cwd=workspace)
    assert (workspace / "runs" / "tiny" / "version_1" / "summary.json").is_file()
    assert (first / "summary.json").read_text() == before


def test_evaluate_checkpoint_reproduces_final_validation(trained_run, workspace):
    _, run_dir = trained_run
    summary = json.loads((run_dir / "summary.json").read_text())
    out = workspace / "eval.json"
    run_cli("--evaluate", summary["checkpoints"]["last"], "--data", "data", "--output", str(out),
            "--num-workers", "0", "--accelerator", "cpu", cwd=workspace)
    results = json.loads(out.read_text())
    for key in ("val/acc", "val/precision", "val/recall"):
        assert results[key] == pytest.approx(summary["metrics"][key], abs=1e-6)


def test_predict_folder_to_csv(trained_run, workspace):
    _, run_dir = trained_run
    out = workspace / "preds.csv"
    run_cli("--predict", "data/val", "--checkpoint", str(run_dir / "checkpoints" / "last.ckpt"), "--output", str(out),
            "--num-workers", "0", "--accelerator", "cpu", cwd=workspace)
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(list((workspace / "data" / "val").rglob("*.jpg")))
    for row in rows:
        assert (workspace / row["path"]).is_file() and row["class"] in CLASSES  # paths as the user gave them
        top = [entry.split(":") for entry in row["top5"].split(";")]
        assert len(top) == 3 and top[0][0] == row["class"]
        assert 0 < float(row["probability"]) <= 1
        assert sum(float(p) for _, p in top) == pytest.approx(1.0, abs=1e-3)
    # Never overwrite the user's file.
    again = run_cli("--predict", "data/val", "--checkpoint", str(run_dir / "checkpoints" / "last.ckpt"), "--output",
                    str(out), "--num-workers", "0", cwd=workspace, check=False)
    assert again.returncode == 2 and "exists" in again.stderr


def test_resume_last_ends_at_the_same_step_as_an_uninterrupted_run(trained_run, workspace):
    _, full = trained_run
    full_summary = json.loads((full / "summary.json").read_text())
    run_cli(*QUICK, "--data", "data", "--epochs", "1", "--logdir", "runs", "--name", "resumed", cwd=workspace)
    run_cli(*QUICK, "--data", "data", "--epochs", "2", "--logdir", "runs", "--name", "resumed", "--resume", "last",
            cwd=workspace)
    resumed = json.loads((workspace / "runs" / "resumed" / "version_0" / "summary.json").read_text())
    assert not (workspace / "runs" / "resumed" / "version_1").exists(), "resume continues the same version folder"
    assert resumed["global_step"] == full_summary["global_step"]
    assert resumed["epochs"] == full_summary["epochs"]


def test_config_file_and_command_line_precedence(workspace):
    config = workspace / "recipe.yaml"
    config.write_text(yaml.safe_dump({"variant": "b0", "epochs": 3, "batch-size": 4, "img_size": [32, 40],
                                      "limit-train-batches": 2, "num-workers": 0, "data": "data"}))
    run_cli("--config", str(config), "--epochs", "1", "--logdir", "runs", "--name", "configured",
            "--accelerator", "cpu", cwd=workspace)
    summary = json.loads((workspace / "runs" / "configured" / "version_0" / "summary.json").read_text())
    assert summary["epochs"] == 1  # command line wins
    assert summary["img_size"] == [32, 40] and summary["global_step"] == 2  # from the file


@pytest.mark.parametrize("args, message", [
    (["--variant", "b9"], "--variant"),
    (["--img-size", "16", "16"], "at least 32"),
    (["--data", "no/such/folder"], "no/such/folder"),
    (["--resume", "missing.ckpt"], "missing.ckpt"),
    (["--resume", "last", "--name", "never-ran", "--data", "data"], "never-ran"),
    (["--predict", "data"], "--checkpoint"),
])
def test_user_errors_exit_2_with_one_clear_message(workspace, args, message):
    logdir = [] if "--predict" in args else ["--logdir", "runs"]  # predict makes no run folder: no --logdir
    proc = run_cli(*args, *logdir, cwd=workspace, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_config_with_unknown_key_is_a_usage_error(workspace):
    config = workspace / "bad.yaml"
    config.write_text("epochz: 3\n")
    proc = run_cli("--config", str(config), cwd=workspace, check=False)
    assert proc.returncode == 2 and "epochz" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_ddp_two_cpu_processes(workspace):
    proc = run_cli(*QUICK, "--data", "data", "--epochs", "1", "--logdir", "runs", "--name", "ddp",
                   "--devices", "2", "--strategy", "ddp", "--limit-train-batches", "2", cwd=workspace)
    versions = list((workspace / "runs" / "ddp").glob("version_*"))
    assert [v.name for v in versions] == ["version_0"], "both ranks must write to one run directory"
    summary = json.loads((versions[0] / "summary.json").read_text())
    assert summary["global_step"] == 2
    # Validation covers the whole set (18 images over 2 ranks), so accuracy is a multiple of 1/18.
    assert (summary["metrics"]["val/acc"] * 18) == pytest.approx(round(summary["metrics"]["val/acc"] * 18), abs=1e-4)
    assert "Run saved to" in proc.stdout
