"""The training and inference entry points in-process: resolved configuration, lr scaling, resume folders, outputs."""

from __future__ import annotations

import csv
import json
import threading
from pathlib import Path

import pytest
import torch
import yaml

from pvt_lightning.cli.main import main
from pvt_lightning.cli.config import parse_args
from pvt_lightning.cli.options import TrainConfig
from pvt_lightning.runs.rundir import RunPaths, claim_version, release_version_env

TINY = ["--variant", "b0", "--img-size", "32", "32", "--num-workers", "0", "--precision", "32",
        "--accelerator", "cpu", "--limit-train-batches", "2", "--limit-val-batches", "1", "--epochs", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from conftest import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("entry") / "data", classes=("a", "b"), per_class=4,
                             size=(32, 32))


def hparams(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "hparams.yaml").read_text())


def trainer_for(argv: list[str], tmp_path: Path):
    """The Trainer train() would build for ``argv`` (nothing is fitted)."""
    from pvt_lightning.cli.assemble import make_trainer

    config = parse_args(TrainConfig, argv)
    return config, make_trainer(config, RunPaths(tmp_path / "runs" / "x" / "version_0"), [])


def test_lr_scales_with_accumulation_and_world_size(tmp_path):
    from pvt_lightning.cli.train import total_batch
    from pvt_lightning.training.optim import scaled_lr

    def lr_for(argv: list[str]) -> float:
        config, trainer = trainer_for(argv, tmp_path)
        return scaled_lr(total_batch(config, trainer), config.base_lr)

    base = ["--accelerator", "cpu", "--base-lr", "5e-4", "--logdir", str(tmp_path)]
    lr_32 = lr_for([*base, "--batch-size", "32"])
    lr_16x2 = lr_for([*base, "--batch-size", "16", "--accumulate-grad-batches", "2"])
    lr_ddp = lr_for([*base, "--batch-size", "32", "--devices", "2", "--strategy", "ddp"])
    assert lr_32 == pytest.approx(5e-4 * 32 / 512)
    assert lr_16x2 == pytest.approx(lr_32)
    assert lr_ddp == pytest.approx(2 * lr_32)


def test_default_root_dir_is_the_run(tmp_path):
    """Lightning's SLURM requeue writes hpc_ckpt_*.ckpt to default_root_dir: it must be the run folder."""
    _, trainer = trainer_for(["--accelerator", "cpu"], tmp_path)
    assert Path(trainer.default_root_dir) == tmp_path / "runs" / "x" / "version_0"


def test_yaml_lr_trains_and_print_config_reproduces_hparams(data, tmp_path, capsys):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("lr: 1e-3\nbatch-size: 4\n")
    argv = [*TINY, "--data", str(data), "--logdir", str(tmp_path / "runs"), "--name", "yaml", "--config",
            str(config_file)]
    assert main(argv) == 0
    first = tmp_path / "runs" / "yaml" / "version_0"
    assert hparams(first)["lr"] == 0.001
    ckpt = torch.load(first / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["initial_lr"] == pytest.approx(1e-3)

    capsys.readouterr()
    assert main([*argv, "--print-config"]) == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    assert main(["--config", str(printed)]) == 0
    second = tmp_path / "runs" / "yaml" / "version_1"
    assert hparams(second) == hparams(first)
    rerun = tmp_path / "runs" / "yaml" / "version_2"
    assert main(["--config", str(first / "hparams.yaml")]) == 0
    assert hparams(rerun) == hparams(first)


def test_checkpoint_loads_without_the_pretrained_file(data, tmp_path):
    from pvt_lightning import ImageClassifier, create_model

    weights = tmp_path / "start.pth"
    torch.save(create_model("b0", num_classes=2).state_dict(), weights)
    assert main([*TINY, "--batch-size", "4", "--data", str(data), "--logdir", str(tmp_path / "runs"), "--name",
                 "pre", "--pretrained", str(weights)]) == 0
    weights.unlink()  # moved or deleted after training
    last = tmp_path / "runs" / "pre" / "version_0" / "checkpoints" / "last.ckpt"
    module = ImageClassifier.load_from_checkpoint(last, map_location="cpu")
    saved = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(value, saved[key]) for key, value in module.state_dict().items())
    assert module.hparams.class_names == ["a", "b"]


def test_csv_logger_writes_metrics_and_keeps_hparams(data, tmp_path):
    assert main([*TINY, "--batch-size", "4", "--data", str(data), "--logdir", str(tmp_path / "runs"), "--name",
                 "csv", "--logger", "csv", "--monitor", "val/recall/a"]) == 0
    run_dir = tmp_path / "runs" / "csv" / "version_0"
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/acc", "val/recall/a"} <= set(header)
    assert hparams(run_dir)["logger"] == "csv" and not list(run_dir.glob("events.out.tfevents.*"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best"]["metric"] == "val/recall/a" and 0 <= summary["best"]["value"] <= 1
    assert summary["memory_measure"] == "cpu_process_tree_pss" and summary["peak_pss_mb"] > 0
    assert "recall_a" in Path(summary["checkpoints"]["best"]).name
    from pvt_lightning.runs.compare import load_scalars, runs_table

    assert load_scalars(run_dir)["val/acc"] == [(0, pytest.approx(summary["metrics"]["val/acc"]))]
    assert runs_table(tmp_path / "runs")[0]["accuracy"] == pytest.approx(summary["metrics"]["val/acc"])


def test_per_class_monitor_must_name_a_class(data, tmp_path, capsys):
    assert main([*TINY, "--data", str(data), "--logdir", str(tmp_path / "runs"), "--monitor", "val/recall/zebra"]) == 2
    assert "zebra" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("version_*"))


def test_evaluate_refuses_to_overwrite_the_checkpoint(data, tmp_path, capsys):
    assert main([*TINY, "--batch-size", "4", "--data", str(data), "--logdir", str(tmp_path / "runs"), "--name",
                 "ev"]) == 0
    last = tmp_path / "runs" / "ev" / "version_0" / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    assert main(["--evaluate", str(last), "--data", str(data), "--output", str(last), "--num-workers", "0"]) == 2
    assert "already exists" in capsys.readouterr().err and last.read_bytes() == before

    predictions = tmp_path / "out" / "predictions.csv"  # its folder does not exist yet
    assert main(["--predict", str(data / "val"), "--checkpoint", str(last), "--output", str(predictions),
                 "--num-workers", "0", "--batch-size", "3"]) == 0
    rows = list(csv.DictReader(predictions.open()))
    assert sorted(row["path"] for row in rows) == sorted(str(p) for p in (data / "val").rglob("*.jpg"))
    assert all(row["class"] in ("a", "b") and 0 < float(row["probability"]) <= 1 for row in rows)
    assert not list(predictions.parent.glob(".*")), "no temporary or part files are left behind"


def test_slurm_requeue_reuses_the_jobs_version_folder(tmp_path, monkeypatch):
    """A requeued SLURM job reruns the same command: it must find its hpc_ckpt in the same run folder."""
    from pvt_lightning.runs.rundir import open_run

    config = parse_args(TrainConfig, ["--logdir", str(tmp_path), "--name", "job", "--img-size", "32", "32"])
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    first = open_run(config).run_dir
    release_version_env()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert open_run(config).run_dir == first
    release_version_env()
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    assert open_run(config).run_dir != first
    release_version_env()


def test_concurrent_claims_get_distinct_versions(tmp_path):
    claimed: list[Path] = []
    threads = [threading.Thread(target=lambda: claimed.append(claim_version(tmp_path / "run"))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({p.name for p in claimed}) == 8 and all(p.is_dir() for p in claimed)
    release_version_env()


def test_a_run_that_fails_before_its_first_checkpoint_says_why(data, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    (broken / "train" / "a" / "000.jpg").write_bytes(b"not a jpeg")
    assert main([*TINY, "--batch-size", "4", "--data", str(broken), "--logdir", str(tmp_path / "runs"), "--name",
                 "broken", "--bad-images", "error"]) == 2
    assert "000.jpg" in capsys.readouterr().err
    failed = (tmp_path / "runs" / "broken" / "version_0" / "failed.txt").read_text()
    assert "before its first checkpoint" in failed and "000.jpg" in failed


@pytest.mark.slow
def test_two_runs_started_together_under_one_name_get_two_folders(data, tmp_path):
    import subprocess
    import sys

    run = [sys.executable, str(Path(__file__).resolve().parents[1] / "experiments" / "run.py"), *TINY,
           "--batch-size", "4", "--data", str(data), "--logdir", str(tmp_path / "runs"), "--name", "same"]
    procs = [subprocess.Popen(run, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=900)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    folders = sorted(p.name for p in (tmp_path / "runs" / "same").iterdir())
    assert folders == ["version_0", "version_1"]
    for folder in folders:
        run_dir = tmp_path / "runs" / "same" / folder
        assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1, "each run writes only its own events"
        assert json.loads((run_dir / "summary.json").read_text())["checkpoints"]["last"].startswith(str(run_dir))


def test_resume_refuses_a_checkpoint_of_other_classes(data, tmp_path, capsys):
    import shutil

    assert main([*TINY, "--batch-size", "4", "--data", str(data), "--logdir", str(tmp_path / "runs"), "--name",
                 "ab"]) == 0
    other = tmp_path / "ac"
    shutil.copytree(data, other)
    for split in ("train", "val"):
        (other / split / "b").rename(other / split / "c")
    last = tmp_path / "runs" / "ab" / "version_0" / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    assert main([*TINY, "--batch-size", "4", "--data", str(other), "--logdir", str(tmp_path / "runs"), "--name",
                 "ac", "--resume", str(last)]) == 2
    err = capsys.readouterr().err
    assert "cannot --resume" in err and "--pretrained" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "ac").exists(), "a refused resume claims no folder"


def test_a_run_trained_with_a_crop_is_evaluated_predicted_and_exported_with_it(data, tmp_path, capsys):
    """--crop-pct is saved in the checkpoint: evaluate, predict and export use it without the flag repeated."""
    pytest.importorskip("onnx")
    from pvt_lightning.export.metadata import read_metadata

    assert main([*TINY, "--batch-size", "4", "--data", str(data), "--logdir", str(tmp_path / "runs"), "--name",
                 "crop", "--crop-pct", "0.95"]) == 0
    last = tmp_path / "runs" / "crop" / "version_0" / "checkpoints" / "last.ckpt"
    assert main(["evaluate", "--checkpoint", str(last), "--data", str(data), "--num-workers", "0",
                 "--output-dir", str(tmp_path / "ev")]) == 0
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["preprocessing"]["crop_pct"] == 0.95 and report["preprocessing"]["img_size"] == [32, 32]
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(last), "--input", str(data / "val"), "--num-workers", "0",
                 "--output", str(tmp_path / "p.csv")]) == 0
    assert "resize to size/0.95 then centre crop" in capsys.readouterr().out
    assert main(["predict", "--checkpoint", str(last), "--input", str(data / "val"), "--num-workers", "0",
                 "--output", str(tmp_path / "q.csv"), "--crop-pct", "0.8"]) == 0
    assert "resize to size/0.8 then centre crop" in capsys.readouterr().out  # a flag still overrides it
    assert main(["export", "--checkpoint", str(last), "--output", str(tmp_path / "m.onnx")]) == 0
    assert read_metadata(tmp_path / "m.onnx").crop_pct == 0.95
