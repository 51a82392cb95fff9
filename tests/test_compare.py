"""Reading runs back (pvt_lightning.runs.compare) and experiments/compare.py, on real event files and real runs."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from conftest import make_image_folder
from pvt_lightning.cli.main import main
from pvt_lightning.runs.compare import epoch_series, find_runs, format_markdown, load_scalars, model_name, runs_table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
CLASSES = ("a", "b", "c")


def compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "compare.py"), *args], capture_output=True,
                          text=True, timeout=300)


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        return {row["run"]: row for row in csv.DictReader(handle)}


def write_events_run(run_dir: Path, val_acc: list[float]) -> None:
    """Events laid out as a training writes them: every scalar at step = epoch."""
    writer = SummaryWriter(str(run_dir))
    for epoch, acc in enumerate(val_acc):
        writer.add_scalar("val/acc", acc, epoch)
        writer.add_scalar("val/precision", acc - 0.1, epoch)
        writer.add_scalar("val/recall", acc - 0.2, epoch)
        writer.add_scalar("val/recall@precision0.90", acc - 0.3, epoch)
        writer.add_scalar("time/epoch_s", 10.0 + epoch, epoch)
        writer.add_scalar("memory/peak_pss_mb", 900.0 + 10 * epoch, epoch)
    writer.close()


# --- fast: event files written directly --------------------------------------------------------------

def test_epoch_series_reads_per_epoch_scalars(tmp_path):
    write_events_run(tmp_path / "run", [0.5, 0.7, 0.6])
    scalars = load_scalars(tmp_path / "run")
    assert epoch_series(scalars, "val/acc") == [(0, 0.5), (1, pytest.approx(0.7)), (2, pytest.approx(0.6))]
    assert epoch_series(scalars, "time/epoch_s") == [(0, 10.0), (1, 11.0), (2, 12.0)]
    assert set(load_scalars(tmp_path / "run", ["val/acc", "missing"])) == {"val/acc"}


def test_unfinished_run_is_a_row_from_its_events(tmp_path):
    write_events_run(tmp_path / "logs" / "b0_32x32" / "version_0", [0.5, 0.7, 0.6])
    [row] = runs_table(tmp_path / "logs")
    assert row["run"] == "b0_32x32/version_0"
    assert row["accuracy"] == pytest.approx(0.6) and row["best_epoch"] == 1 and row["epochs"] == 3
    assert row["precision"] == pytest.approx(0.5) and row["recall"] == pytest.approx(0.4)
    assert row["epoch_time_s"] == pytest.approx(11.0) and row["peak_memory_mb"] == pytest.approx(920.0)
    assert row["memory_device"] == "cpu" and row["pr_of"] == "macro" and row["params_m"] is None


def test_find_runs_filters_by_path_and_model_names_follow_the_seed(tmp_path):
    for name in ("b0_32x32", "b2_li_224x224", "resnet50_384x224"):
        write_events_run(tmp_path / name / "version_0", [0.5])
    assert [run.parent.name for run in find_runs(tmp_path, "li")] == ["b2_li_224x224"]
    assert len(find_runs(tmp_path)) == 3
    assert model_name("b5", False) == "pvt_v2_b5" and model_name("b0", True) == "pvt_v2_b0_li"
    assert model_name("b2_li", True) == "pvt_v2_b2_li" and model_name("resnet50", None) == "resnet50"
    with pytest.raises(FileNotFoundError, match="--logdir"):
        find_runs(tmp_path / "absent")


def test_markdown_table_is_the_practitioners_table(tmp_path):
    write_events_run(tmp_path / "r" / "version_0", [0.9])
    markdown = format_markdown(runs_table(tmp_path))
    header, rule, row = markdown.splitlines()
    assert header == ("| model | input | batch x devices | time / epoch | peak memory | precision / recall | "
                      "recall @ precision | accuracy | inference img/s | batch-1 latency | params (M) | GMACs | "
                      "best epoch | run |")
    assert rule.count("---") == header.count("|") - 1
    assert "| 10.0 s | 900 MB CPU | 80.0 / 70.0 | 60.0 @P0.90 | 90.0 |" in row  # recall at P from the events


def summary_run(run_dir: Path, positive_class: str | None, recall_at_p: dict[str, float], img_s: float) -> None:
    """A finished run's folder as far as the table reads it: summary.json with its final figures."""
    run_dir.mkdir(parents=True)
    summary = {"variant": "b0", "linear_sra": False, "img_size": [32, 32], "params_m": 3.4, "gmacs": 0.01,
               "epoch_time_s": 12.0, "peak_memory_mb": 700.0, "memory_device": "cpu", "batch_size": 16,
               "world_size": 2, "epochs": 3, "best": {"epoch": 2}, "positive_class": positive_class,
               "metrics": {"val/acc": 0.9, "val/precision": 0.85, "val/recall": 0.8, **recall_at_p},
               "recall_at_precision": {"precisions": [0.95, 0.9], "method": "exact"},
               "inference": {"device": "cpu (2 threads)", "precision": "32-true", "img_size": [32, 32],
                             "batch_size": 16, "img_s": img_s, "batch1_img_s": 40.0, "latency_ms_p50": 25.0,
                             "latency_ms_p90": 31.5}}
    (run_dir / "summary.json").write_text(json.dumps(summary))


def test_table_reads_recall_at_the_first_reported_precision_and_inference_speed(tmp_path):
    from pvt_lightning.cli.main import main as cli_main

    summary_run(tmp_path / "runs" / "macro" / "version_0", None,
                {"val/recall@precision0.95": 0.5, "val/recall@precision0.90": 0.7}, img_s=321.0)
    summary_run(tmp_path / "runs" / "positive" / "version_0", "cat",
                {"val/recall@precision0.95": 0.4, "val/recall@precision0.95/cat": 0.25}, img_s=12.5)
    rows = {row["run"]: row for row in runs_table(tmp_path / "runs")}
    macro, positive = rows["macro/version_0"], rows["positive/version_0"]
    assert (macro["recall_at_precision"], macro["at_precision"]) == (0.5, 0.95)
    assert macro["recall_at_precision_of"] == "macro"
    assert (positive["recall_at_precision"], positive["recall_at_precision_of"]) == (0.25, "cat")
    assert macro["inference_img_s"] == 321.0 and macro["latency_ms_p50"] == 25.0 and macro["batch_size"] == 16
    markdown = format_markdown([macro, positive])
    assert "| 16 x 2 | 12.0 s | 700 MB CPU | 85.0 / 80.0 | 50.0 @P0.95 | 90.0 | 321 | 25.0 ms | 3.40 | 0.010 |" \
        in markdown
    assert "| 25.0 @P0.95 (cat) | 90.0 | 12.5 | 25.0 ms |" in markdown
    out = tmp_path / "out"
    assert cli_main(["compare", "--logdir", str(tmp_path / "runs"), "--out", str(out)]) == 0
    assert (out / "recall_vs_speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = read_csv(out / "runs.csv")
    assert list(written["macro/version_0"])[:14] == ["run", "model", "input", "params_m", "gmacs", "epoch_time_s",
                                                     "peak_memory_mb", "memory_device", "precision", "recall", "pr_of",
                                                     "accuracy", "best_epoch", "epochs"]  # old columns first, unchanged
    assert float(written["positive/version_0"]["recall_at_precision"]) == 0.25
    assert float(written["macro/version_0"]["inference_img_s"]) == 321.0


@pytest.mark.slow
def test_no_runs_is_a_clear_error_exit_2(tmp_path):
    done = compare("--logdir", str(tmp_path), "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert done.stderr.startswith(f"pvt-lightning: error: no runs under {tmp_path}") and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("make", ["absent", "filtered"])
def test_missing_logdir_or_filtered_out_runs_exit_2(tmp_path, capsys, make):
    args = ["--logdir", str(tmp_path / "absent")]
    if make == "filtered":
        write_events_run(tmp_path / "b0" / "version_0", [0.5])
        args = ["--logdir", str(tmp_path), "--filter", "b5"]
    assert main(["compare", *args, "--out", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err
    assert message.startswith("pvt-lightning: error: ") and ("does not exist" in message if make == "absent" else "'b5'" in message)
    assert not (tmp_path / "out").exists()


# --- slow: two real runs through the CLI, then compare.py -------------------------------------------------

@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """b0 with linear SRA off (reporting class 'a' one-vs-rest) and on, trained by experiments/run.py."""
    base = tmp_path_factory.mktemp("compare")
    data = make_image_folder(base / "data", classes=CLASSES, per_class=6, size=(32, 32))
    logdir = base / "runs"
    common = ["--variant", "b0", "--data", str(data), "--img-size", "32", "32", "--epochs", "2", "--batch-size",
              "4", "--limit-train-batches", "2", "--limit-val-batches", "2", "--num-workers", "0",
              "--logdir", str(logdir)]
    for extra in (["--name", "b0_32x32", "--positive-class", "a"], ["--name", "b0_li_32x32", "--linear-sra"]):
        done = subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), *common, *extra],
                              capture_output=True, text=True, timeout=600, cwd=base)
        assert done.returncode == 0, done.stderr[-3000:]
    return logdir


@pytest.mark.slow
def test_compare_rows_match_summary_json(cli_runs, tmp_path):
    out = tmp_path / "out"
    done = compare("--logdir", str(cli_runs), "--out", str(out))
    assert done.returncode == 0, done.stderr
    rows = read_csv(out / "runs.csv")
    assert set(rows) == {"b0_32x32/version_0", "b0_li_32x32/version_0"}
    for run, row in rows.items():
        summary = json.loads((cli_runs / run / "summary.json").read_text())
        for column, expected in (("params_m", summary["params_m"]), ("gmacs", summary["gmacs"]),
                                 ("epoch_time_s", summary["epoch_time_s"]),
                                 ("peak_memory_mb", summary["peak_memory_mb"]),
                                 ("accuracy", summary["metrics"]["val/acc"]), ("best_epoch", summary["best"]["epoch"]),
                                 ("epochs", summary["epochs"])):
            assert float(row[column]) == pytest.approx(expected), (run, column)
        assert row["input"] == "32x32" and row["memory_device"] == summary["memory_device"] == "cpu"
        assert float(row["peak_memory_mb"]) > 0 and float(row["epoch_time_s"]) > 0
    li = rows["b0_li_32x32/version_0"]
    li_summary = json.loads((cli_runs / "b0_li_32x32/version_0/summary.json").read_text())
    assert li["model"] == "pvt_v2_b0_li" and li["pr_of"] == "macro"
    assert float(li["precision"]) == pytest.approx(li_summary["metrics"]["val/precision"])
    assert float(li["recall"]) == pytest.approx(li_summary["metrics"]["val/recall"])
    # With --positive-class the table reports that class, as its final logged values say.
    plain = rows["b0_32x32/version_0"]
    events = EventAccumulator(str(cli_runs / "b0_32x32/version_0")).Reload()
    assert plain["model"] == "pvt_v2_b0" and plain["pr_of"] == "a"
    assert float(plain["precision"]) == pytest.approx(events.Scalars("val/positive/precision/a")[-1].value)
    assert float(plain["recall"]) == pytest.approx(events.Scalars("val/positive/recall/a")[-1].value)
    # the printed table and the Markdown carry both runs, the plots exist
    for text in (done.stdout, (out / "runs.md").read_text()):
        assert "pvt_v2_b0 " in text and "pvt_v2_b0_li" in text
    for plot in ("val_acc.png", "val_recall.png", "memory.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_filter_and_an_unfinished_run(cli_runs, tmp_path):
    logdir = tmp_path / "runs"
    shutil.copytree(cli_runs, logdir)
    (logdir / "b0_li_32x32/version_0/summary.json").unlink()
    rows = runs_table(logdir, filter="li")
    assert [row["run"] for row in rows] == ["b0_li_32x32/version_0"]
    events = EventAccumulator(str(logdir / "b0_li_32x32/version_0")).Reload()
    assert rows[0]["accuracy"] == pytest.approx(events.Scalars("val/acc")[-1].value)
    assert rows[0]["epochs"] == 2 and rows[0]["memory_device"] == "cpu"


# --- slow: the practitioner's table over a ResNet-50, a b0 and a b2_li run ----------------------------------

@pytest.mark.slow
def test_practitioners_table_over_three_model_families(tmp_path):
    """Every column has a value for each run, the b0 run's recall at P is its positive class's, and the recall
    vs speed plot is written next to the other plots."""
    data = make_image_folder(tmp_path / "data", classes=CLASSES, per_class=4, size=(32, 32))
    logdir = tmp_path / "runs"
    common = ["--data", str(data), "--img-size", "32", "32", "--epochs", "1", "--batch-size", "4",
              "--limit-train-batches", "2", "--num-workers", "0", "--accelerator", "cpu", "--precision", "32",
              "--logdir", str(logdir), "--no-progress-bar", "--inference-seconds", "0.5"]
    for extra in (["--variant", "resnet50"], ["--variant", "b0", "--positive-class", "a"], ["--variant", "b2_li"]):
        done = subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), *common, *extra],
                              capture_output=True, text=True, timeout=900, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "out"
    done = compare("--logdir", str(logdir), "--out", str(out))
    assert done.returncode == 0, done.stderr
    header, *rows = [line for line in (out / "runs.md").read_text().splitlines() if line.startswith("| ")]  # no rule
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    assert columns[:12] == ["model", "input", "batch x devices", "time / epoch", "peak memory", "precision / recall",
                            "recall @ precision", "accuracy", "inference img/s", "batch-1 latency", "params (M)",
                            "GMACs"]
    cells = {}
    for row in rows:
        values = [cell.strip() for cell in row.strip("|").split("|")]
        cells[values[0]] = dict(zip(columns, values))
    assert set(cells) == {"resnet50", "pvt_v2_b0", "pvt_v2_b2_li"}
    for model, row in cells.items():
        assert all(value not in ("", "-", "?") for value in row.values()), (model, row)
        assert row["batch x devices"] == "4 x 1" and row["input"] == "32x32"
        assert re.fullmatch(r"\d+\.\d @P0\.90( \(a\))?", row["recall @ precision"]), row
        assert row["batch-1 latency"].endswith(" ms")
    assert cells["pvt_v2_b0"]["recall @ precision"].endswith("(a)")
    for model in cells:
        assert model in done.stdout  # the printed table has the same rows
    assert "recall_vs_speed.png" in done.stdout
    assert (out / "recall_vs_speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = read_csv(out / "runs.csv")
    for run, row in table.items():
        summary = json.loads((logdir / run / "summary.json").read_text())
        assert float(row["inference_img_s"]) == pytest.approx(summary["inference"]["img_s"])
        assert float(row["latency_ms_p50"]) == pytest.approx(summary["inference"]["latency_ms_p50"])
