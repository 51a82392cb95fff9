"""int8 export: static quantization calibrated on real images, the accuracy gate, and the file it leaves.

Fast tier: b2_li's architecture (linear SRA, one block per stage, random weights) exported with dynamic sizes,
quantized on a generated ImageFolder; the int8 graph runs at several sizes and follows the fp32 graph; the
command's mistakes. Slow tier: the export command end to end, the gate refusing (nothing written) and passing
(metadata recorded).
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from pvt_lightning.errors import DataError  # noqa: E402
from pvt_lightning.cli.export import main  # noqa: E402
from pvt_lightning.export.metadata import ExportMetadata, read_metadata  # noqa: E402
from pvt_lightning.export.runtime import OnnxClassifier  # noqa: E402
from pvt_lightning.export.trace import export_model  # noqa: E402
from pvt_lightning.export.quantize import (CalibrationReader, accuracy_gate, image_batches, quantize_onnx,  # noqa: E402
                                           read_quantization, with_metadata)
from pvt_lightning.models import create_model  # noqa: E402

CLASSES = ("a", "b", "c")


@pytest.fixture(scope="module")
def b2_li(tmp_path_factory) -> dict:
    """A dynamic-size fp32 ONNX of b2_li's architecture, its int8 version and the image folder it was calibrated on."""
    from conftest import make_image_folder

    root = tmp_path_factory.mktemp("int8")
    data = make_image_folder(root / "data", classes=CLASSES, per_class=6, size=(40, 36))
    torch.manual_seed(0)
    model = create_model("b2_li", num_classes=3, depths=(1, 1, 1, 1)).eval()
    metadata = ExportMetadata(variant="b2_li", class_names=CLASSES, img_size=(32, 32), linear_sra=True)
    export_model(model, root / "fp32.onnx", dynamic=True, metadata=metadata)
    meta = read_metadata(root / "fp32.onnx")
    reader = CalibrationReader(image_batches(data, "train", meta, limit=10, batch_size=4), "images", None)
    quantize_onnx(root / "fp32.onnx", root / "int8.onnx", reader)
    return {"data": data, "fp32": root / "fp32.onnx", "int8": root / "int8.onnx", "meta": meta, "reader": reader,
            "model": model}


def test_calibration_reads_a_seeded_sample_of_real_images(b2_li):
    assert b2_li["reader"].images == 10  # limit=10 of the 18 train images
    first = [labels.tolist() for _, labels in image_batches(b2_li["data"], "train", b2_li["meta"], limit=10, seed=3)]
    again = [labels.tolist() for _, labels in image_batches(b2_li["data"], "train", b2_li["meta"], limit=10, seed=3)]
    every = [labels.tolist() for _, labels in image_batches(b2_li["data"], "train", b2_li["meta"])]
    assert first == again and sum(map(len, first)) == 10 and sum(map(len, every)) == 18
    reader = CalibrationReader(image_batches(b2_li["data"], "train", b2_li["meta"], limit=10, batch_size=4), "x", None)
    assert len(reader) == 3 and [len(b) for b in reader.batches] == [4, 4, 2]
    reader.set_range(1, 3)  # onnxruntime's strided calibration reads one window at a time
    assert [len(reader.get_next()["x"]), len(reader.get_next()["x"]), reader.get_next()] == [4, 2, None]
    fixed = CalibrationReader(image_batches(b2_li["data"], "train", b2_li["meta"], limit=10, batch_size=4), "x", 4)
    assert [len(b) for b in fixed.batches] == [4, 4, 4] and fixed.images == 10


@torch.inference_mode()
@pytest.mark.parametrize("size", [(32, 32), (64, 48), (96, 64)])
def test_int8_linear_sra_runs_at_any_size_and_follows_fp32(b2_li, size):
    """Real val images (the calibrated ranges hold for images, not for random noise) at sizes other than traced."""
    import dataclasses

    fp32, int8 = OnnxClassifier(b2_li["fp32"]), OnnxClassifier(b2_li["int8"])
    assert int8.metadata.dynamic_size and int8.metadata.linear_sra
    images = np.concatenate([x for x, _ in image_batches(b2_li["data"], "val", dataclasses.replace(b2_li["meta"],
                                                                                                   img_size=size))])
    x = torch.from_numpy(images)
    assert x.shape == (18, 3, *size)
    reference, quantized = fp32(x), int8(x)
    assert quantized.shape == (18, 3) and torch.isfinite(quantized).all()
    assert torch.allclose(reference, b2_li["model"](x), atol=1e-4)
    assert not torch.equal(quantized, reference)  # really quantized
    spread = (reference.max() - reference.min()).item()
    assert (quantized - reference).abs().mean().item() <= 0.1 * spread
    assert np.corrcoef(reference.flatten(), quantized.flatten())[0, 1] >= 0.95


def test_int8_file_is_smaller_and_made_of_integer_kernels(b2_li):
    import onnx

    proto = onnx.load(str(b2_li["int8"]))
    kinds = {node.op_type for node in proto.graph.node}
    assert {"QLinearConv", "QLinearMatMul"} & kinds or "MatMulInteger" in kinds or "ConvInteger" in kinds
    assert b2_li["int8"].stat().st_size < 0.5 * b2_li["fp32"].stat().st_size


def test_metadata_keeps_the_export_keys_and_records_quantization(b2_li, tmp_path):
    record = {"mode": "int8-static", "per_channel": True, "calibration_data": str(b2_li["data"]),
              "calibration_images": 10}
    path = tmp_path / "recorded.onnx"
    path.write_bytes(with_metadata(b2_li["int8"], b2_li["meta"].to_strings(), record))
    assert read_quantization(path) == record and read_quantization(b2_li["fp32"]) is None
    assert read_metadata(path) == b2_li["meta"]


def test_gate_figures_are_measured_on_the_val_split(b2_li):
    fp32 = OnnxClassifier(b2_li["fp32"])
    same = accuracy_gate(fp32, fp32, image_batches(b2_li["data"], "val", b2_li["meta"]), 3, 0.0, 0.0)
    assert same.images == 18 and same.accuracy_drop == 0 and same.recall_drop == 0 and same.passed
    impossible = accuracy_gate(fp32, fp32, image_batches(b2_li["data"], "val", b2_li["meta"]), 3, -0.01, 0.0)
    assert not impossible.passed and "top-1" in "\n".join(impossible.lines())


def test_calibration_data_of_other_classes_is_refused(b2_li, make_image_folder, tmp_path):
    other = make_image_folder(tmp_path / "other", classes=("x", "y", "z"), per_class=2)
    with pytest.raises(DataError, match="not the model's"):
        next(image_batches(other, "train", b2_li["meta"]))


@pytest.mark.parametrize("flags, message", [
    (["--quantize", "int8"], "needs --calibration-data"),
    (["--calibration-data", "."], "goes with --quantize int8"),
    (["--quantize", "int8", "--calibration-data", "no/such/folder"], "no such folder"),
    (["--quantize", "int8", "--calibration-data", ".", "--format", "exported-program"], "writes ONNX"),
])
def test_quantize_mistakes_are_one_line_exit_2(flags, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    suffix = ".pt2" if "exported-program" in flags else ".onnx"
    assert main(["--variant", "b0", "--num-classes", "3", "--output", f"m{suffix}", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not list(tmp_path.iterdir())


# --- slow tier: the export command end to end ---------------------------------------------------------------------

@pytest.mark.slow
def test_export_command_gate_refuses_then_passes(make_image_folder, tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", classes=("0", "1", "2"), per_class=5, size=(36, 36))
    common = ["--variant", "b0", "--num-classes", "3", "--img-size", "32", "32", "--dynamic", "--quantize", "int8",
              "--calibration-data", str(data)]
    refused = tmp_path / "refused.onnx"
    assert main([*common, "--output", str(refused), "--max-accuracy-drop", "-101"]) == 2
    captured = capsys.readouterr()
    assert "int8 refused" in captured.err and "nothing was written" in captured.err
    assert "fp32" in captured.out and "int8" in captured.out and "recall@precision0.9" in captured.out
    assert not refused.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["data"]

    kept = tmp_path / "kept.onnx"
    assert main([*common, "--output", str(kept), "--max-accuracy-drop", "100", "--max-recall-drop", "100"]) == 0
    record = read_quantization(kept)
    assert record["mode"] == "int8-static" and record["per_channel"] is True
    assert record["calibration_data"] == str(data.resolve()) and record["calibration_split"] == "train"
    assert record["calibration_images"] == 15 and record["gate"]["val_images"] == 15
    meta = read_metadata(kept)
    assert meta.class_names == ("0", "1", "2") and meta.dynamic_size
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 48, 40)).astype(np.float32))
    assert OnnxClassifier(kept)(x).shape == (2, 3)
    assert main([*common, "--output", str(kept), "--max-accuracy-drop", "100", "--max-recall-drop", "100"]) == 2
    assert "already exists" in capsys.readouterr().err  # never replaced unasked
