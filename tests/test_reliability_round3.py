"""Issue 28, reliability round three: resume that cannot rewrite history, values that cannot be absurd, no traceback
anywhere. Every case is made for real: run folders trained for a step or two, YAML files on disk, exported models,
truncated files; the command runs in-process through ``cli.main`` (subprocesses in the ``slow`` tests)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_image_folder
from pvt_lightning.cli.main import main
from pvt_lightning.errors import CheckpointError, DataError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--variant", "b0", "--img-size", "32", "32", "--batch-size", "4", "--num-workers", "0", "--precision", "32",
        "--accelerator", "cpu", "--inference-seconds", "0", "--no-progress-bar"]
IMBALANCED = ["--class-weights", "balanced", "--sampler", "balanced", "--loss", "focal"]


def refused(capsys, argv, *needles: str) -> str:
    """Run ``argv``: exit status 2 and one line naming each of ``needles``, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    line = err.splitlines()[-1]
    assert "Traceback" not in err and line.startswith("pvt-lightning: error: "), err[-2000:]
    for needle in needles:
        assert needle in line, line
    return line


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: what "left untouched" compares."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("round3")
    make_image_folder(root / "data", classes=("a", "b"), per_class=4, size=(32, 32))
    return root


def train_run(workspace: Path, name: str, *extra: str) -> Path:
    argv = [*TINY, "--data", str(workspace / "data"), "--logdir", str(workspace / "runs"), "--name", name, *extra]
    assert main(argv) == 0
    return workspace / "runs" / name / "version_0"


@pytest.fixture(scope="module")
def finished(workspace) -> Path:
    """A finished 1-epoch run trained with class weights, a balanced sampler and focal loss; never changed by a test."""
    return train_run(workspace, "finished", "--epochs", "1", *IMBALANCED)


def resume_argv(workspace: Path, name: str, *extra: str) -> list[str]:
    return ["train", "--logdir", str(workspace / "runs"), "--name", name, "--resume", "last", *extra]


# --- 1, 2: resume continues exactly the run it names --------------------------------------------------------------

def test_resuming_a_finished_run_without_more_epochs_changes_nothing(finished, workspace, capsys):
    before = files_of(finished)
    capsys.readouterr()
    assert main(resume_argv(workspace, "finished", "--num-workers", "0")) == 0
    out = capsys.readouterr().out
    assert "Nothing to do" in out and "--epochs" in out
    assert files_of(finished) == before, "summary.json, hparams.yaml and the event files are left as they were"
    assert json.loads(before["summary.json"])["metrics"], "the summary still holds the run's metrics"


@pytest.mark.parametrize("flags, named", [
    (["--recipe", "paper"], "--recipe paper (the run: small)"),
    (["--batch-size", "8"], "--batch-size 8 (the run: 4)"),
    (["--loss", "ce"], "--loss ce (the run: focal)"),
    (["--sampler", "none", "--class-weights", "none"], "--class-weights none (the run: balanced)"),
    (["--img-size", "64", "64"], "--img-size 64 64 (the run: 32 32)"),
    (["--augment", "strong"], "--augment strong (the run: basic)"),
    (["--num-workers", "2"], "--num-workers 2 (the run: 0)"),  # the loader's saved position is per worker
])
def test_resume_refuses_flags_that_change_what_is_trained(finished, workspace, capsys, flags, named):
    before = files_of(finished)
    line = refused(capsys, resume_argv(workspace, "finished", "--epochs", "2", *flags), "cannot --resume", named,
                   "--pretrained")
    assert "--sampler none (the run: balanced)" in line or "--sampler" not in flags
    assert files_of(finished) == before
    assert sorted(p.name for p in finished.parent.iterdir()) == ["version_0"]


def test_last_checkpoint_follows_every_epoch_even_when_the_monitor_does_not_improve(workspace, capsys):
    """Lightning writes last.ckpt only with a new best: a resume of such a run would train its last epoch again."""
    run = train_run(workspace, "flat", "--epochs", "2", "--lr", "1e-12", "--warmup-epochs", "0")  # nothing changes
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best"]["epoch"] == 0, "the monitor did not improve after the first epoch"
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == summary["global_step"] == 4
    before = files_of(run)
    capsys.readouterr()
    assert main(resume_argv(workspace, "flat")) == 0 and "Nothing to do" in capsys.readouterr().out
    assert files_of(run) == before


def test_resume_from_a_config_file_is_refused(finished, workspace, tmp_path, capsys):
    config = tmp_path / "old_hparams.yaml"
    config.write_text(f"name: finished\nlogdir: {workspace / 'runs'}\nresume: last\nepochs: 2\n")
    before = files_of(finished)
    refused(capsys, ["train", "--config", str(config)], "'resume' in a --config file", "--resume")
    assert files_of(finished) == before


def test_a_resumed_run_keeps_its_settings_records_its_parts_and_hparams_never_resume(workspace, capsys):
    run = train_run(workspace, "extended", "--epochs", "1", *IMBALANCED)
    first = json.loads((run / "summary.json").read_text())
    capsys.readouterr()
    # No flag repeated: only the longer schedule, and a flag that only changes how often last.ckpt is written.
    assert main(resume_argv(workspace, "extended", "--epochs", "2", "--checkpoint-every-minutes", "10")) == 0
    out = capsys.readouterr().out
    assert "changed: --checkpoint-every-minutes 30.0 -> 10.0; --epochs 1 -> 2" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["global_step"] == 2 * first["global_step"]
    assert summary["imbalance_handling"]["loss"] == "focal"
    assert (summary["imbalance_handling"]["class_weights"], summary["imbalance_handling"]["sampler"]) == (
        "balanced", "balanced")
    parts = summary["parts"]
    assert [(p["epochs"], p["global_step"]) for p in parts] == [(1, first["global_step"]), (2, summary["global_step"])]
    assert parts[0]["wall_time_s"] == first["wall_time_s"] and parts[1]["changed"] == {
        "--epochs": {"from": 1, "to": 2}, "--checkpoint-every-minutes": {"from": 30.0, "to": 10.0}}
    assert summary["wall_time_s"] == pytest.approx(parts[0]["wall_time_s"] + parts[1]["wall_time_s"], abs=0.11)
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["hyper_parameters"]["loss"] == "focal" and last["hyper_parameters"]["class_weights"] is not None
    hparams = yaml.safe_load((run / "hparams.yaml").read_text())
    assert hparams["resume"] is None and hparams["epochs"] == 2 and hparams["recipe"] == "small"
    assert hparams["checkpoint-every-minutes"] == 10.0

    # --config hparams.yaml reruns the configuration as a new version; the resumed run is left alone.
    before = files_of(run)
    assert main(["train", "--config", str(run / "hparams.yaml"), "--epochs", "1"]) == 0
    assert files_of(run) == before
    rerun = json.loads((run.parent / "version_1" / "summary.json").read_text())
    assert [p["resumed_from"] for p in rerun["parts"]] == [None] and rerun["epochs"] == 1


# --- 3: operating points ------------------------------------------------------------------------------------------

def write_point(path: Path, temperature, thresholds) -> Path:
    path.write_text(json.dumps({"temperature": temperature, "thresholds": thresholds}))
    return path


@pytest.mark.parametrize("temperature, thresholds, message", [
    (True, {"a": 0.5, "b": 0.5}, "temperature is true"),
    (0, {"a": 0.5, "b": 0.5}, "temperature 0 is outside"),
    (1e9, {"a": 0.5, "b": 0.5}, "temperature 1000000000.0 is outside"),
    ("1.5", {"a": 0.5, "b": 0.5}, "not a number"),
    (1.0, {"a": 1.5, "b": 0.5}, "threshold of 'a' is 1.5"),
    (1.0, {"a": -0.1, "b": None}, "threshold of 'a' is -0.1"),
    (1.0, {"a": True, "b": 0.5}, "threshold of 'a' is true"),
])
def test_operating_point_values_out_of_range_are_refused(tmp_path, temperature, thresholds, message):
    from pvt_lightning.evaluation.operating_point import OperatingPoint

    path = write_point(tmp_path / "op.json", temperature, thresholds)
    with pytest.raises(DataError, match="not an operating point") as caught:
        OperatingPoint.load(path, ["a", "b"])
    assert message in str(caught.value)


def test_operating_point_non_finite_json_numbers_are_refused(tmp_path):
    from pvt_lightning.evaluation.operating_point import OperatingPoint

    for text in ('{"temperature": NaN, "thresholds": {"a": 0.5}}', '{"temperature": Infinity, "thresholds": {"a": 0.5}}',
                 '{"temperature": 1.0, "thresholds": {"a": NaN}}'):
        (tmp_path / "op.json").write_text(text)
        with pytest.raises(DataError, match="not an operating point"):
            OperatingPoint.load(tmp_path / "op.json", ["a"])


def test_operating_point_classes_are_compared_as_sets(tmp_path):
    from pvt_lightning.evaluation.operating_point import OperatingPoint

    path = write_point(tmp_path / "op.json", 1.5, {"b": 0.25, "a": 0.75})
    point = OperatingPoint.load(path, ["a", "b"])
    assert list(point.thresholds.items()) == [("a", 0.75), ("b", 0.25)], "reordered to the model's classes"
    names = [f"class_{i:02d}" for i in range(30)]
    write_point(path, 1.0, {name: 0.5 for name in names[:29] + ["intruder"]})
    with pytest.raises(DataError) as caught:
        OperatingPoint.load(path, names)
    assert "missing 'class_29'" in str(caught.value) and "extra 'intruder'" in str(caught.value)


# --- 4: --config files ----------------------------------------------------------------------------------------------

BOMB = "".join(f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("name, content, message", [
    ("bomb.yaml", 'a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]\n' + BOMB, "aliases expand to"),
    ("binary.yaml", b"\xff\xfe\x00\x81 not text \x00", "is not a text file"),
    ("empty.yaml", "", "is empty"),
    ("comments.yaml", "# nothing but a comment\n", "is empty"),
    ("list.yaml", "- 1\n- 2\n", "holds a list"),
    ("broken.yaml", "epochs: [1, 2\n", "is not valid YAML"),
    ("self.yaml", "a: &a [*a]\n", "refers to itself"),
])
def test_hostile_config_files_are_refused_in_one_line(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    started = time.perf_counter()
    refused(capsys, ["train", "--config", str(path), "--print-config"], f"--config {path}", message)
    assert time.perf_counter() - started < 30, "refused quickly, not after expanding the aliases"


def test_missing_folder_and_huge_config_files_are_refused(tmp_path, capsys):
    refused(capsys, ["train", "--config", str(tmp_path / "absent.yaml")], "no such file")
    refused(capsys, ["train", "--config", str(tmp_path)], "is a folder")
    huge = tmp_path / "huge.yaml"
    huge.write_text("# padding\n" * 200_000)
    refused(capsys, ["train", "--config", str(huge)], "bytes")


def test_help_lists_one_print_config(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--print-config" in text and "--print_config" not in text


# --- 5: devices -----------------------------------------------------------------------------------------------------

def test_more_cpu_devices_than_cores_is_refused_before_a_folder_is_claimed(workspace, capsys):
    refused(capsys, [*TINY, "--data", str(workspace / "data"), "--logdir", str(workspace / "runs"), "--name",
                     "too_many", "--devices", "99", "--strategy", "ddp"], "--devices 99", "core")
    assert not (workspace / "runs" / "too_many").exists()


def test_a_device_listed_twice_is_refused(capsys):
    refused(capsys, ["train", "--devices", "0,0", "--accelerator", "cpu", "--print-config"], "--devices 0,0",
            "listed twice")


# --- 6: numbers that cannot be absurd -------------------------------------------------------------------------------

def float_options(schema: type) -> list[str]:
    """Every option of ``schema`` whose type admits a float (jsonargparse's restricted floats subclass float)."""
    def admits_float(hint) -> bool:
        if isinstance(hint, type):
            return issubclass(hint, float)
        return any(admits_float(arg) for arg in typing.get_args(hint))

    hints = typing.get_type_hints(schema)
    return [f.name for f in dataclasses.fields(schema) if admits_float(hints[f.name])]


def schemas() -> list[tuple[str, type]]:
    from pvt_lightning.cli.export import ExportConfig
    from pvt_lightning.cli.options import EvaluateConfig, PredictConfig, TrainConfig

    return [("train", TrainConfig), ("evaluate", EvaluateConfig), ("predict", PredictConfig),
            ("export", ExportConfig)]


NON_FINITE = [("inf", "inf"), ("1e400", "inf"), ("nan", "nan"), ("-inf", "-inf")]


@pytest.mark.parametrize("command, schema", schemas(), ids=[name for name, _ in schemas()])
def test_every_float_option_refuses_non_finite_numbers_from_flags_and_yaml(tmp_path, capsys, command, schema):
    names = float_options(schema)
    assert names, "the schema has float options"
    for name in names:
        flag = "--" + name.replace("_", "-")
        for text, _ in NON_FINITE:
            refused(capsys, [command, f"{flag}={text}", "--print-config"], flag)
        config = tmp_path / "c.yaml"
        for text in (".inf", "-.inf", ".nan", "1e400"):
            config.write_text(f"{name.replace('_', '-')}: {text}\n")
            refused(capsys, [command, "--config", str(config), "--print-config"], flag)


@pytest.mark.parametrize("argv, named", [
    (["--lr", "1e300"], "--lr 1e+300: at most 10"),
    (["--base-lr", "1e300"], "--base-lr"),
    (["--weight-decay", "1e30"], "--weight-decay"),
    (["--warmup-epochs", "1e12"], "--warmup-epochs"),
])
def test_absurd_finite_values_are_refused(capsys, argv, named):
    refused(capsys, ["train", *argv, "--print-config"], named)


@pytest.mark.parametrize("size", ["[32]", "[32, 32, 32]", "[]"])
def test_yaml_img_size_needs_two_numbers(tmp_path, capsys, size):
    config = tmp_path / "c.yaml"
    config.write_text(f"img-size: {size}\n")
    refused(capsys, ["train", "--config", str(config), "--print-config"], "--img-size", "two numbers")


# --- 6, 7, 8: inference files ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(finished, workspace) -> Path:
    """The finished run's last.ckpt exported to ONNX at its fixed 32x32 size."""
    path = workspace / "fixed.onnx"
    assert main(["export", "--checkpoint", str(finished / "checkpoints" / "last.ckpt"), "--output", str(path)]) == 0
    return path


def test_predict_refuses_truncated_and_garbage_exports(exported, workspace, tmp_path, capsys):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(exported.read_bytes()[:4000])
    (tmp_path / "garbage.pt2").write_bytes(b"not a zip archive at all")
    (tmp_path / "truncated.pt2").write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    for name in ("truncated.onnx", "garbage.pt2", "truncated.pt2"):
        refused(capsys, ["predict", "--checkpoint", str(tmp_path / name), "--input", str(workspace / "data" / "val"),
                         "--output", str(tmp_path / f"{name}.csv"), "--num-workers", "0", "--accelerator", "cpu"],
                name)
        assert not list(tmp_path.glob(f"*{name}.csv*"))


def test_predict_and_evaluate_refuse_another_size_for_a_fixed_size_export(exported, workspace, tmp_path, capsys):
    common = ["--checkpoint", str(exported), "--img-size", "64", "64", "--num-workers", "0", "--accelerator", "cpu"]
    refused(capsys, ["predict", *common, "--input", str(workspace / "data" / "val"), "--output",
                     str(tmp_path / "p.csv")], "--img-size 64 64", "32x32", "--dynamic")
    refused(capsys, ["evaluate", *common, "--data", str(workspace / "data"), "--output-dir", str(tmp_path / "ev")],
            "--img-size 64 64", "32x32")
    assert not list(tmp_path.rglob("*")), "nothing written"


def test_evaluate_accepts_an_exported_model(exported, workspace, tmp_path):
    out = tmp_path / "ev"
    assert main(["evaluate", "--checkpoint", str(exported), "--data", str(workspace / "data"), "--output-dir",
                 str(out), "--num-workers", "0", "--accelerator", "cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["num_images"] == 8 and report["checkpoint"] == str(exported)


def test_export_refuses_a_size_that_cannot_fit_in_memory(finished, tmp_path, capsys):
    started = time.perf_counter()
    refused(capsys, ["export", "--checkpoint", str(finished / "checkpoints" / "last.ckpt"), "--output",
                     str(tmp_path / "big.onnx"), "--img-size", "100000", "100000"], "--img-size 100000 100000", "GiB")
    assert time.perf_counter() - started < 60 and not list(tmp_path.iterdir())


def test_predict_takes_a_single_image_file(finished, workspace, tmp_path, capsys):
    image = workspace / "data" / "val" / "b" / "000.jpg"
    out = tmp_path / "one.csv"
    assert main(["predict", "--checkpoint", str(finished / "checkpoints" / "last.ckpt"), "--input", str(image),
                 "--output", str(out), "--num-workers", "0", "--accelerator", "cpu"]) == 0
    rows = out.read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith(str(image) + ",")
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("hello")
    refused(capsys, ["predict", "--checkpoint", str(finished / "checkpoints" / "last.ckpt"), "--input",
                     str(not_an_image), "--output", str(tmp_path / "two.csv")], "not an image")


def test_a_failed_predict_leaves_no_hidden_part_file(finished, workspace, tmp_path, capsys):
    out = tmp_path / "preds" / "out.csv"
    refused(capsys, ["predict", "--checkpoint", str(finished / "checkpoints" / "last.ckpt"), "--input",
                     str(workspace / "data" / "val"), "--output", str(out), "--num-workers", "0", "--accelerator",
                     "cpu", "--bad-images", "error", "--max-image-pixels", "10"], "pixel budget")
    assert not out.parent.exists() or not list(out.parent.iterdir()), "no .out.csv.rank0.part left"


def test_evaluate_overwrite_removes_the_earlier_operating_point(finished, workspace, tmp_path):
    out = tmp_path / "ev"
    argv = ["evaluate", "--checkpoint", str(finished / "checkpoints" / "last.ckpt"), "--data", str(workspace / "data"),
            "--output-dir", str(out), "--num-workers", "0", "--accelerator", "cpu"]
    assert main([*argv, "--target-precision", "0.5"]) == 0
    assert (out / "operating_point.json").is_file()
    (out / "notes.txt").write_text("the user's own file")
    assert main([*argv, "--overwrite"]) == 0
    assert not (out / "operating_point.json").exists(), "no stale operating point beside a report that has none"
    assert json.loads((out / "report.json").read_text())["operating_point"] is None
    assert (out / "notes.txt").read_text() == "the user's own file", "only known evaluation files are removed"


# --- 8: messages ----------------------------------------------------------------------------------------------------

class Payload:
    def __reduce__(self):
        return (os.system, ("true",))


def test_weights_with_a_blocked_global_are_reported_unsafe_not_corrupt(tmp_path):
    from pvt_lightning.models.weights import read_state_dict_file

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": Payload()}, path)
    with pytest.raises(CheckpointError) as caught:
        read_state_dict_file(path)
    message = str(caught.value)
    assert "refused to load" in message and "arbitrary code" in message and "system" in message
    assert "corrupt" not in message and "download it again" not in message


def test_a_data_root_with_only_a_test_split_is_refused(workspace, tmp_path, capsys):
    root = tmp_path / "only_test"
    make_image_folder(root / "test", classes=("a", "b"), per_class=2, size=(32, 32), split=False)
    refused(capsys, [*TINY, "--data", str(root), "--logdir", str(tmp_path / "runs")], "holds only test/",
            "train/")
    assert not (tmp_path / "runs").exists()


def test_a_nan_loss_names_the_unusual_settings_besides_the_learning_rate(workspace, capsys):
    argv = [*TINY, "--data", str(workspace / "data"), "--logdir", str(workspace / "runs"), "--name", "diverges",
            "--epochs", "4", "--lr", "9", "--warmup-epochs", "0", "--weight-decay", "5", "--loss", "focal",
            "--focal-gamma", "8"]
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err and "training loss is" in err
    assert "--lr" in err and "--weight-decay 5" in err and "--focal-gamma 8" in err


def test_schedules_that_cannot_do_what_they_say_are_named_in_the_banner(workspace, capsys):
    run = train_run(workspace, "probe", "--epochs", "1", "--recipe", "finetune", "--freeze-backbone-epochs", "1")
    out = capsys.readouterr().out
    assert "fine-tuning pretrained weights" not in out and "from random weights (no --pretrained)" in out
    assert "warm-up capped from 1 to 0.25 epochs" in out, "the finetune recipe's 1-epoch warm-up fills a 1-epoch run"
    assert "--freeze-backbone-epochs 1 >= --epochs 1" in out and "linear probe" in out
    assert yaml.safe_load((run / "hparams.yaml").read_text())["warmup-epochs"] == 0.25


# --- slow: real processes and a longer fit --------------------------------------------------------------------------

def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=900, env=env)


@pytest.mark.slow
def test_run_py_resume_last_of_a_finished_run_is_a_no_op_and_a_billion_laughs_is_refused(tmp_path):
    make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=4, size=(32, 32))
    assert run_cli(*TINY, "--data", "data", "--logdir", "runs", "--epochs", "1", "--name", "done",
                   cwd=tmp_path).returncode == 0
    run = tmp_path / "runs" / "done" / "version_0"
    before = files_of(run)
    proc = run_cli("--logdir", "runs", "--name", "done", "--resume", "last", cwd=tmp_path)
    assert proc.returncode == 0 and "Nothing to do" in proc.stdout, proc.stderr[-2000:]
    assert files_of(run) == before
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text('a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]\n' + BOMB)
    started = time.perf_counter()
    proc = run_cli("--config", str(bomb), cwd=tmp_path)
    assert proc.returncode == 2 and "aliases expand to" in proc.stderr and "Traceback" not in proc.stderr
    assert time.perf_counter() - started < 300


@pytest.mark.slow
def test_a_one_epoch_finetune_of_weights_that_know_the_task_keeps_what_they_know(tmp_path):
    make_image_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=12, size=(32, 32))
    base = ["--data", str(tmp_path / "data"), "--logdir", str(tmp_path / "runs"), *TINY[:5], "--batch-size", "8",
            *TINY[7:]]
    assert main([*base, "--name", "base", "--epochs", "6"]) == 0
    learnt = json.loads((tmp_path / "runs" / "base" / "version_0" / "summary.json").read_text())["metrics"]["val/acc"]
    assert learnt >= 0.9, "the base run learns the task"
    weights = tmp_path / "runs" / "base" / "version_0" / "checkpoints" / "last.ckpt"
    assert main([*base, "--name", "tuned", "--epochs", "1", "--recipe", "finetune", "--pretrained", str(weights)]) == 0
    tuned = json.loads((tmp_path / "runs" / "tuned" / "version_0" / "summary.json").read_text())
    assert tuned["metrics"]["val/acc"] >= learnt - 0.1, "one epoch of fine-tuning keeps what the weights know"
    assert yaml.safe_load((tmp_path / "runs" / "tuned" / "version_0" / "hparams.yaml").read_text())[
        "warmup-epochs"] == 0.25
