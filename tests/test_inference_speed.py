"""Inference speed: the measurement (training/inference_speed.py) and ``pvt-lightning speed`` on a checkpoint."""

from __future__ import annotations

import json
import time

import lightning
import numpy as np
import pytest
import torch
from torch import nn

from pvt_lightning import ImageClassifier
from pvt_lightning.cli.main import main
from pvt_lightning.training.inference_speed import INFERENCE_FIELDS, measure_inference_speed, percentile, time_calls


class Sleepy(nn.Module):
    """A model whose forward takes a known time: 2 ms per call plus 1 ms per image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.002 + 0.001 * x.shape[0])
        return x.mean(dim=(2, 3))


def test_the_block_has_exactly_the_summary_fields_and_measures_the_model():
    block = measure_inference_speed(Sleepy(), (24, 16), batch_size=8, device="cpu", precision="32", seconds=0.4)
    assert tuple(block) == INFERENCE_FIELDS
    assert block["img_size"] == [24, 16] and block["batch_size"] == 8 and block["precision"] == "32"
    assert block["device"].startswith("cpu (")
    # batch 8: >= 10 ms per call -> at most 800 images/s; batch 1: >= 3 ms -> at most 333 images/s
    assert 0 < block["img_s"] <= 800 and 0 < block["batch1_img_s"] <= 334
    assert 3.0 <= block["latency_ms_p50"] <= block["latency_ms_p90"]
    assert block["batch1_img_s"] == pytest.approx(1000 / block["latency_ms_p50"], rel=1e-3)  # both the median


def test_timing_warms_up_then_times_at_least_min_calls():
    calls = []
    times = time_calls(lambda: calls.append(1), torch.device("cpu"), seconds=0.0, min_calls=5, warmup_calls=2)
    assert len(times) == 5 and len(calls) == 7


def test_percentile_interpolates_like_numpy():
    values = [5.0, 1.0, 3.0, 2.0, 8.0, 13.0]
    for q in (0, 50, 90, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def write_run(root, batch_size: int = 2):
    """A run folder as training leaves it: hparams.yaml, summary.json and a Lightning-format checkpoint."""
    run_dir = root / "runs" / "b0_32x32" / "version_0"
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    module = ImageClassifier("b0", num_classes=2, class_names=["a", "b"], img_size=(32, 32))
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": lightning.__version__, "epoch": 0, "global_step": 1}, checkpoint)
    (run_dir / "hparams.yaml").write_text("variant: b0\n")
    summary = {"variant": "b0", "batch_size": batch_size, "checkpoints": {"last": str(checkpoint)},
               "inference": {"device": "cuda (elsewhere)", "precision": "bf16-mixed", "img_size": [32, 32],
                             "batch_size": batch_size, "img_s": 999.0, "batch1_img_s": 99.0, "latency_ms_p50": 10.1,
                             "latency_ms_p90": 12.3}}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return run_dir, checkpoint


def test_speed_appends_a_measurement_next_to_the_run_and_leaves_summary_json(tmp_path, capsys):
    run_dir, checkpoint = write_run(tmp_path)
    before = (run_dir / "summary.json").read_bytes()
    assert main(["speed", "--checkpoint", str(checkpoint), "--seconds", "0.2", "--device", "cpu"]) == 0
    [record] = json.loads((run_dir / "inference_measurements.json").read_text())
    assert set(INFERENCE_FIELDS) <= set(record) and record["runtime"] == "eager"
    assert record["batch_size"] == 2 and record["img_size"] == [32, 32]  # the run's batch, the model's size
    assert record["precision"] == "32" and record["device"].startswith("cpu")
    assert record["file"] == str(checkpoint.resolve()) and record["img_s"] > 0 and record["latency_ms_p50"] > 0
    assert (run_dir / "summary.json").read_bytes() == before
    out = capsys.readouterr().out
    assert "eager" in out and "img/s" in out and "inference_measurements.json" in out


def test_speed_refuses_a_measurements_file_it_did_not_write(tmp_path, capsys):
    run_dir, checkpoint = write_run(tmp_path)
    (run_dir / "inference_measurements.json").write_text("my notes\n")
    assert main(["speed", "--checkpoint", str(checkpoint), "--seconds", "0.1", "--device", "cpu"]) == 2
    assert "not a JSON list" in capsys.readouterr().err
    assert (run_dir / "inference_measurements.json").read_text() == "my notes\n"
