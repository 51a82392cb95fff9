"""Prediction at scale: several processes (Lightning's distributed sampler) write one output equal to one
process's; CSV or Parquet by the extension with the same content; ``--topk``; a stopped predict keeps its
parts and the same command resumes from them, writing every image once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_image_folder

from pvt_lightning.cli.main import main
from pvt_lightning.evaluation.writer import output_rows, read_part

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("a", "b", "c")
CPU = ["--num-workers", "0", "--accelerator", "cpu", "--precision", "32"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A b0 checkpoint trained a few steps on 3 colour classes, and a nested folder of 120 images to predict."""
    base = tmp_path_factory.mktemp("predict_scale")
    data = make_image_folder(base / "data", classes=CLASSES, per_class=4, size=(32, 32))
    assert main(["--variant", "b0", "--img-size", "32", "32", *CPU, "--data", str(data), "--batch-size", "4",
                 "--epochs", "1", "--limit-train-batches", "2", "--inference-seconds", "0", "--logdir",
                 str(base / "runs"), "--name", "b0"]) == 0
    images = make_image_folder(base / "images", classes=CLASSES, per_class=20, size=(32, 32), seed=3)
    return base / "runs" / "b0" / "version_0" / "checkpoints" / "last.ckpt", images


def predict_argv(model, output: Path, *extra: str) -> list[str]:
    checkpoint, images = model
    return ["predict", "--checkpoint", str(checkpoint), "--input", str(images), "--output", str(output),
            "--batch-size", "4", *CPU, *extra]


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory) -> dict[str, dict]:
    """One uninterrupted single-process run with --topk 2, by path."""
    out = tmp_path_factory.mktemp("reference") / "preds.csv"
    assert main(predict_argv(model, out, "--topk", "2")) == 0
    return by_path(output_rows(out))


def by_path(rows: list[dict]) -> dict[str, dict]:
    paths = [row["path"] for row in rows]
    assert len(paths) == len(set(paths)), "no image twice"
    return {row["path"]: row for row in rows}


def assert_same_predictions(rows: dict[str, dict], expected: dict[str, dict]) -> None:
    assert rows.keys() == expected.keys()
    for path, row in rows.items():
        want = expected[path]
        assert list(row) == list(want)
        for column, value in row.items():
            if column.endswith("prob") or column == "probability":
                assert float(value) == pytest.approx(float(want[column]), abs=1e-6 + 1e-12), (path, column)
            elif column == "top5":  # 4 decimals: compare the classes and the values within rounding
                got, exp = ([item.split(":") for item in text.split(";")] for text in (value, want[column]))
                assert [float(p) for _, p in got] == pytest.approx([float(p) for _, p in exp], abs=1e-4 + 1e-12)
            else:
                assert value == want[column], (path, column)


def test_topk_columns_follow_the_existing_ones(model, reference):
    images = model[1]
    assert len(reference) == len(list(images.rglob("*.jpg"))) == 120
    for row in reference.values():
        assert list(row) == ["path", "class", "probability", "top5", "top1_class", "top1_prob", "top2_class",
                             "top2_prob"]
        assert row["top1_class"] == row["class"] and row["top1_prob"] == row["probability"]
        assert row["top2_class"] != row["top1_class"] and float(row["top2_prob"]) <= float(row["top1_prob"])
        assert row["top5"].split(";")[1].split(":")[0] == row["top2_class"]


def test_parquet_holds_the_csv_content(model, reference, tmp_path):
    pytest.importorskip("pyarrow")  # the [data] extra
    out = tmp_path / "preds.parquet"
    assert main(predict_argv(model, out, "--topk", "2")) == 0
    rows = by_path(output_rows(out))
    assert rows.keys() == reference.keys()
    for path, row in rows.items():
        want = reference[path]
        assert list(row) == list(want)
        for column, value in row.items():
            if isinstance(value, float):  # probabilities: float64 of the CSV's digits
                assert value == float(want[column]), (path, column)
            else:
                assert value == want[column], (path, column)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no part or settings file left"


@pytest.mark.parametrize("flags, message", [
    (["--topk", "4"], "--topk 4: the model has 3 classes"),
    (["--output", "preds.txt"], "give a .csv or .parquet file"),
])
def test_bad_output_options_are_usage_errors(model, tmp_path, capsys, flags, message):
    argv = predict_argv(model, tmp_path / "preds.csv")
    if flags[0] == "--output":
        argv[argv.index("--output") + 1] = str(tmp_path / flags[1])
        flags = []
    assert main([*argv, *flags]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_cut_row_at_the_end_of_a_part_is_left_out(tmp_path):
    part = tmp_path / ".p.csv.0.rank0.part"
    part.write_text('a.jpg,x,0.5,x:0.5\n"b\nc.jpg",y,0.25,y:0.25\nd.jpg,x,0.5')  # killed while writing d.jpg
    assert [row[0] for row in read_part(part, 4)] == ["a.jpg", "b\nc.jpg"]
    part.write_text('a.jpg,x,0.5,x:0.5\n"e\nf.jpg",y,0.')
    assert [row[0] for row in read_part(part, 4)] == ["a.jpg"]


def test_a_restart_skips_the_images_kept_parts_hold(model, reference, tmp_path, capsys):
    """Simulated: the parts of a run stopped after some batches (one cut row at the end), as a killed run leaves
    them; the real kill is ``test_a_killed_predict_resumes_without_duplicates``."""
    out = tmp_path / "preds.csv"
    argv = predict_argv(model, out, "--topk", "2")
    kept = sorted(reference)[:50]
    lines = [",".join(reference[p].values()) for p in kept]  # paths here hold no comma or quote
    (tmp_path / ".preds.csv.0.rank0.part").write_text("\n".join(lines[:30]) + "\n" + lines[30][:20])
    (tmp_path / ".preds.csv.0.rank1.part").write_text("\n".join(lines[31:]) + "\n")
    capsys.readouterr()
    assert main(argv) == 0
    assert "Resuming: 49 images already predicted" in capsys.readouterr().out
    rows = by_path(output_rows(out))
    assert_same_predictions(rows, reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.csv"], "parts and settings removed after the join"


def test_parts_of_another_command_are_refused_and_overwrite_starts_over(model, reference, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    first = min(reference)
    (tmp_path / ".preds.csv.0.rank0.part").write_text(",".join(reference[first].values()) + "\n")
    (tmp_path / ".preds.csv.parts.json").write_text(json.dumps({"tta": True, "columns": ["path"]}))
    assert main(predict_argv(model, out, "--topk", "2")) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "tta" in err and "--overwrite" in err
    assert not out.exists()
    assert main(predict_argv(model, out, "--topk", "2", "--overwrite")) == 0
    assert "Resuming" not in capsys.readouterr().out
    assert_same_predictions(by_path(output_rows(out)), reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.csv"]


def cli(*argv: str, **kwargs) -> subprocess.Popen:
    """``pvt-lightning`` in a subprocess (its own process group), importing this checkout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "pvt_lightning.cli", *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **kwargs)


def finished(proc: subprocess.Popen, timeout: float = 600) -> str:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # every rank, so none is left holding a core or a port
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"still running after {timeout} s:\n{out[-3000:]}\n{err[-3000:]}")
    assert proc.returncode == 0, f"{out[-3000:]}\n{err[-3000:]}"
    return out


@pytest.mark.slow
def test_two_processes_write_the_single_process_output(model, reference, tmp_path):
    out = tmp_path / "preds.csv"
    said = finished(cli(*predict_argv(model, out, "--topk", "2", "--devices", "2", "--strategy", "ddp")))
    assert "Predicted 120 images" in said and "(joined from run 1 rank 0: 60, run 1 rank 1: 60)" in said, said
    assert_same_predictions(by_path(output_rows(out)), reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.csv"]


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2])
def test_a_killed_predict_resumes_without_duplicates(model, reference, tmp_path, devices):
    """SIGKILL (no handler runs, as a pre-emption or an OOM kill) once a first batch is flushed, then the same
    command again: it reads the parts on every rank, predicts the rest, and the output has every image once."""
    out = tmp_path / "preds.csv"
    argv = predict_argv(model, out, "--topk", "2")
    argv[argv.index("--batch-size") + 1] = "2"
    if devices > 1:
        argv += ["--devices", str(devices), "--strategy", "ddp"]
    proc = cli(*argv)
    first = tmp_path / ".preds.csv.0.rank0.part"
    deadline = time.monotonic() + 300
    while not (first.exists() and first.stat().st_size > 0) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: every rank
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "killed before it finished"
    assert not out.exists()
    parts = sorted(tmp_path.glob(".preds.csv.0.rank*.part"))
    written = sum(len(list(read_part(part, 8))) for part in parts)
    assert 0 < written < len(reference)
    resumed = finished(cli(*argv))
    assert f"Resuming: {written} images already predicted" in resumed, resumed
    assert_same_predictions(by_path(output_rows(out)), reference)
    if devices == 1:
        assert f"run 1 rank 0: {written}, run 2 rank 0: {len(reference) - written}" in resumed, resumed
    else:  # both ranks of the second run split what was left
        assert "run 2 rank 0: " in resumed and "run 2 rank 1: " in resumed, resumed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.csv"]
