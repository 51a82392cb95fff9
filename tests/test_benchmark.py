"""The benchmark tooling (tools.bench) stays apart from the library; experiments/benchmark.py runs end
to end on tiny settings and writes complete tables; bad flags exit 2."""

import csv
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pvt_lightning import create_model
from tools.bench import timing
from pvt_lightning.runs.tables import markdown_table, write_csv

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "benchmark.py"
NUMERIC = ["params_m", "gmacs", "ours_img_s", "ref_img_s", "ratio", "ratio_lo", "ratio_hi", "ours_peak_mb",
           "ref_peak_mb", "ours_act_mb", "ref_act_mb", "ours_gflop_s", "pct_of_peak"]


def run(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


def test_import_pvt_lightning_pulls_no_tooling():
    """A fresh ``import pvt_lightning`` (its modules dropped from sys.modules, then put back) loads no bench module."""
    ours = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "pvt_lightning"}
    try:
        for name in ours:
            del sys.modules[name]
        importlib.import_module("pvt_lightning")
        fresh = [name for name in sys.modules if name.split(".")[0] == "pvt_lightning"]
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] == "pvt_lightning"]:
            del sys.modules[name]
        sys.modules.update(ours)
    assert "pvt_lightning.models.registry" in fresh
    assert not [name for name in fresh if name.startswith("tools.bench")]


def test_interleaved_times_alternate_the_order():
    calls = []

    def task(name):
        return lambda: calls.append(name) or 1.0

    times = timing.interleaved_times([task("A"), task("B")], repeats=4, warmup=1)
    assert "".join(calls) == "AB" + "ABBAABBA"  # warm-up, then A B, B A, ...: no position bias
    assert times == [[1.0] * 4, [1.0] * 4]


def test_tables_mark_missing_values(tmp_path):
    rows = [dict(variant="b0", img_s=12.345, ratio=None), dict(variant="b2", img_s=3.5, ratio=1.01)]
    assert markdown_table(rows, ["variant", "img_s", "ratio"]).splitlines() == [
        "| variant | img_s | ratio |", "|---|---|---|", "| b0 | 12.3 | - |", "| b2 | 3.500 | 1.010 |"]
    with open(write_csv(rows, tmp_path / "t.csv")) as f:
        assert list(csv.DictReader(f)) == [dict(variant="b0", img_s="12.345", ratio=""),
                                           dict(variant="b2", img_s="3.5", ratio="1.01")]


@pytest.mark.slow
def test_benchmark_end_to_end(tmp_path):
    pytest.importorskip("timm")
    proc = run("--variants", "b0", "--sizes", "64x64", "--batch-size", "2", "--steps", "1", "--warmup", "0",
               "--threads", "1", "--memory-steps", "1", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "ratio" in proc.stdout
    with open(tmp_path / "benchmark.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["variant"], r["size"], r["mode"]) for r in rows] == [("b0", "64x64", "infer"), ("b0", "64x64", "train")]
    for row in rows:
        assert row["reference"] == "timm pvt_v2_b0"
        values = {k: float(row[k]) for k in NUMERIC}  # every numeric column is filled and parses
        assert values["ours_img_s"] > 0 and values["ref_img_s"] > 0 and values["ours_peak_mb"] > 0
        assert values["ratio"] == pytest.approx(values["ours_img_s"] / values["ref_img_s"], rel=1e-6)
        assert values["ratio_lo"] == values["ratio"] == values["ratio_hi"]  # one step pair: no interval
        assert round(values["params_m"], 2) == 3.67
    train = rows[1]
    assert float(train["ours_act_mb"]) > 0
    md = (tmp_path / "benchmark.md").read_text().splitlines()
    assert md[0].startswith("Machine: cpu")
    table = [line for line in md if line.startswith("| b0 ")]
    assert len(table) == 2 and all(line.count("|") == len(NUMERIC) + 8 for line in table)  # + mfu: "-" on CPU


def test_paired_speed_ratio_interval():
    """Sign-test interval for the median: with 10 pairs P(Binomial(10, 1/2) <= 1) = 11/1024, so the 2nd
    and 9th smallest ratios bound it at 1 - 22/1024 coverage; with 5 pairs only [min, max] (1 - 2/32)."""
    ten = timing.paired_speed_ratio([2.0] * 10, [2.0 * r for r in (7, 3, 9, 1, 10, 5, 2, 8, 6, 4)])
    assert (ten.median, ten.low, ten.high) == (5.5, 2.0, 9.0)
    assert ten.confidence == pytest.approx(1 - 22 / 1024)
    five = timing.paired_speed_ratio([1.0] * 5, [0.5, 2.0, 1.0, 4.0, 1.5])  # B's times over A's: A is faster
    assert (five.median, five.low, five.high) == (1.5, 0.5, 4.0)
    assert five.confidence == pytest.approx(1 - 2 / 32)
    with pytest.raises(ValueError, match="same number"):
        timing.paired_speed_ratio([1.0, 2.0], [1.0])


@pytest.mark.slow
def test_bf16_mixed_on_cpu(tmp_path):
    """bf16-mixed runs on CPU for both models, autocast included, and says so in the precision column."""
    pytest.importorskip("timm")
    proc = run("--variants", "b0", "--sizes", "32x32", "--batch-size", "1", "--steps", "1", "--warmup", "0",
               "--precision", "bf16-mixed", "--no-memory", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "benchmark.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["mode"], r["precision"]) for r in rows] == [("infer", "bf16-mixed"), ("train", "bf16-mixed")]
    assert all(float(r["ours_img_s"]) > 0 and float(r["ref_img_s"]) > 0 for r in rows)
    with timing.autocast_context("cpu", "bf16-mixed"):  # what the timed steps run under
        assert create_model("b0", num_classes=3)(torch.randn(1, 3, 32, 32)).dtype == torch.bfloat16


@pytest.mark.parametrize("flags, message", [
    (["--variants", "b9"], "unknown model variant 'b9'"),
    (["--sizes", "224by224"], "malformed size '224by224'"),
    (["--sizes", "16x16"], "too small"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--precision", "16-mixed", "--device", "cpu"], "needs a GPU"),
    (["--compile", "--compile-regions"], "exclude each other"),
])
def test_bad_flags_exit_2_with_one_message(flags, message, capsys):
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    try:
        status = script.main([*flags, "--out", "/nonexistent/never-written"])
    except SystemExit as stop:  # argparse's own errors
        status = stop.code
    assert status == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_data_loader_mode(tmp_path):
    proc = run("--data-loader", "--images", "6", "--sizes", "48x64", "--workers", "2", "--batch-size", "2",
               "--repeats", "1", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "benchmark_data.csv") as f:
        rows = list(csv.DictReader(f))
    # one worker's decode+augment, then the real DataLoaders with 2 worker processes each
    assert [(r["pipeline"].split()[0], r["workers"]) for r in rows] == [
        ("ours", "1"), ("torchvision", "1"), ("ours", "2"), ("torchvision", "2")]
    assert all(r["size"] == "48x64" and float(r["img_s"]) > 0 for r in rows)
    assert float(rows[2]["img_s_per_worker"]) == pytest.approx(float(rows[2]["img_s"]) / 2)
    assert float(rows[1]["ratio_vs_torchvision"]) == float(rows[3]["ratio_vs_torchvision"]) == 1.0
