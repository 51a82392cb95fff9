"""Export for deployment: ONNX and ExportedProgram files that run at any input size, checked against eager.

Fast tier: b0 and b2_li's architecture (widths, heads, linear SRA for b2_li; one block per stage keeps export
time down, the slow tier exports b0 and b2_li at full depth and every other variant too) at 224x224, 384x224 and 512x320 from one dynamic file per
format. Tests of the file handling around the export use a one-layer classifier.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pvt_lightning.cli.export import main
from pvt_lightning.export.metadata import ExportMetadata, read_metadata
from pvt_lightning.export.optional import EXTRA_HINT
from pvt_lightning.export.parity import verify_exported
from pvt_lightning.export.runtime import load_exported
from pvt_lightning.export.trace import export_checkpoint, export_model
from pvt_lightning.errors import MissingExportDependency, ParityError
from pvt_lightning.models import VARIANTS, create_model
from pvt_lightning.models.attention import pool_matrix
from pvt_lightning.errors import OutputExistsError

SIZES = [(224, 224), (384, 224), (512, 320)]
ROOT = Path(__file__).resolve().parents[1]
SUFFIX = {"onnx": ".onnx", "exported-program": ".pt2"}


def small_model(name: str) -> torch.nn.Module:
    """The variant's widths, heads and attention (linear SRA for b2_li), one block per stage."""
    torch.manual_seed(0)
    return create_model(name, num_classes=3, depths=(1, 1, 1, 1)).eval()


class OneLayer(torch.nn.Module):
    """A classifier that exports in a moment: global average pool, then a linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.head(x.mean(dim=(2, 3)))


METADATA = dict(variant="test", class_names=("cat", "dog", "bird"), img_size=(224, 224), mean=(0.5, 0.4, 0.3),
                std=(0.2, 0.25, 0.3), crop_pct=0.95)


@pytest.fixture(scope="module", params=[("b0", "onnx"), ("b2_li", "onnx"), ("b0", "exported-program"),
                                        ("b2_li", "exported-program")], ids=lambda p: f"{p[0]}-{p[1]}")
def exported(request, tmp_path_factory):
    """(model, path, export result, the file loaded back): one dynamic file per variant and format, shared by the
    tests below (reading a .pt2 back takes seconds, so it is read once)."""
    name, fmt = request.param
    model = small_model(name)
    path = tmp_path_factory.mktemp("export") / f"{name}{SUFFIX[fmt]}"
    metadata = ExportMetadata(**METADATA, linear_sra=name == "b2_li")
    result = export_model(model, path, dynamic=True, metadata=metadata)
    return model, path, result, load_exported(path)


@torch.inference_mode()
def test_one_dynamic_file_matches_eager_at_every_size(exported):
    model, path, result, runner = exported
    assert [c.size for c in result.checks] == SIZES  # the export-time check covered the sizes
    for batch, size in [(1, SIZES[0]), (3, SIZES[1]), (2, SIZES[2]), (1, (33, 47))]:
        x = torch.randn(batch, 3, *size)
        got = runner(x)
        assert got.shape == (batch, 3)
        assert (got - model(x)).abs().max().item() <= 1e-4, size


def test_onnx_graph_has_named_dims_and_no_baked_gather(exported):
    _, path, _, _ = exported
    if path.suffix != ".onnx":
        pytest.skip("ONNX graph structure")
    import onnx

    graph = onnx.load(str(path)).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    assert [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim] == ["batch", 3]
    # adaptive pooling's decomposition gathers with indices computed from the traced size
    assert not [n for n in graph.node if n.op_type in ("Gather", "GatherElements", "GatherND")]


def test_metadata_round_trips(exported):
    model, path, _, runner = exported
    expected = ExportMetadata(variant="test", class_names=("cat", "dog", "bird"), img_size=(224, 224),
                              mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), crop_pct=0.95,
                              linear_sra=model.config.linear_sra, dynamic_batch=True, dynamic_size=True)
    assert read_metadata(path) == expected
    assert runner.class_names == ["cat", "dog", "bird"]
    assert (runner.img_size, runner.mean, runner.std, runner.crop_pct) == ((224, 224), (0.5, 0.4, 0.3),
                                                                        (0.2, 0.25, 0.3), 0.95)
    assert runner.hparams.class_names == ["cat", "dog", "bird"] and runner.hparams.img_size == [224, 224]


def test_parity_check_catches_a_tampered_onnx_file(exported, tmp_path):
    model, path, _, runner = exported
    if path.suffix != ".onnx":
        pytest.skip("tampering edits an ONNX initializer")
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    weight = next(init for init in proto.graph.initializer if init.name == "head.weight")
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.01, weight.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(proto, str(tampered))
    assert verify_exported(path, model)  # the original passes
    with pytest.raises(ParityError, match=r"at 224x224 \(batch 2\): max \|diff\| \S+ > tolerance 0.0001"):
        verify_exported(tampered, model)


def test_parity_check_catches_a_too_tight_tolerance(exported):
    model, path, _, runner = exported
    if path.suffix != ".onnx":
        pytest.skip("onnxruntime rounds differently from eager; a .pt2 can match it exactly")
    with pytest.raises(ParityError, match="max \\|diff\\|"):
        verify_exported(path, model, tolerance=1e-12)


class ExportDiverges(OneLayer):
    """A model whose traced path differs from its eager one (the bug class the parity check exists for)."""

    def forward(self, x):
        logits = super().forward(x)
        return logits + 1e-3 if torch.compiler.is_exporting() else logits


@pytest.mark.parametrize("suffix", [".onnx", ".pt2"])
def test_failed_parity_writes_nothing(tmp_path, suffix):
    output = tmp_path / f"model{suffix}"
    with pytest.raises(ParityError, match="32x32"):
        export_model(ExportDiverges(), output, img_size=(32, 32))
    assert not output.exists() and not list(tmp_path.iterdir())


def test_existing_file_is_never_replaced_unasked(tmp_path):
    output = tmp_path / "model.onnx"
    output.write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        export_model(OneLayer(), output, img_size=(32, 32))
    assert output.read_text() == "mine"
    export_model(OneLayer(), output, img_size=(32, 32), overwrite=True)
    assert read_metadata(output).img_size == (32, 32)


@torch.inference_mode()
def test_fixed_size_file_runs_any_batch_and_refuses_other_sizes(tmp_path):
    model = OneLayer().eval()
    output = tmp_path / "fixed.onnx"
    result = export_model(model, output, img_size=(64, 48), batch_size=4)
    meta = result.metadata
    assert (meta.dynamic_batch, meta.dynamic_size, meta.batch_size) == (False, False, 4)
    runner = load_exported(output)
    x = torch.randn(6, 3, 64, 48)  # runs as batches of 4 (the last padded)
    assert (runner(x) - model(x)).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="64x48 inputs only.*--dynamic"):
        runner(torch.randn(1, 3, 64, 64))


def test_missing_extra_names_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an environment without the extra does
    with pytest.raises(MissingExportDependency, match=EXTRA_HINT.replace("[", r"\[").replace("]", r"\]")):
        export_model(OneLayer(), tmp_path / "m.onnx", img_size=(32, 32))
    assert 'pip install "pvt-lightning[export]"' in EXTRA_HINT


def test_export_pooling_matrix_is_adaptive_pooling():
    """The matrix built from (symbolic) sizes while exporting averages exactly adaptive pooling's bins."""
    for n in [7, 8, 12, 13, 14, 20, 28, 49, 56, 57, 96, 100]:
        reference = F.adaptive_avg_pool1d(torch.eye(n, dtype=torch.float64)[None], 7)[0].T  # (7, n)
        assert torch.allclose(pool_matrix(n, 7, torch.device("cpu"), torch.float64), reference), n


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    existing = tmp_path / "model.onnx"
    existing.write_text("x")
    cases = [
        (["--variant", "b0", "--output", str(existing)], "already exists"),
        (["--variant", "b0", "--output", str(tmp_path / "m.txt")], "name it .onnx or .pt2"),
        (["--variant", "b0", "--output", str(tmp_path / "m.onnx"), "--opset", "12"], "opset 18 or newer"),
        (["--variant", "b0", "--output", str(tmp_path / "m.onnx"), "--batch-size", "many"], "--batch-size"),
        (["--output", str(tmp_path / "m.onnx")], "--checkpoint CKPT"),
        (["--checkpoint", str(tmp_path / "none.ckpt"), "--output", str(tmp_path / "m.onnx")], "no such file"),
        (["--variant", "b9", "--output", str(tmp_path / "m.onnx")], "unknown model variant"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, (argv, err)


def test_cli_exports_a_variant(tmp_path, capsys):
    output = tmp_path / "b0.pt2"
    assert main(["--variant", "b0", "--num-classes", "4", "--img-size", "64", "64", "--output", str(output),
                 "--format", "exported-program", "--batch-size", "dynamic"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {output}" in out and "parity vs eager at 64x64 (batch 2)" in out
    meta = read_metadata(output)
    assert (meta.variant, meta.num_classes, meta.dynamic_batch, meta.dynamic_size) == ("b0", 4, True, False)


# --- a checkpoint's own preprocessing ----------------------------------------------------------------------------

def test_checkpoint_exports_its_own_preprocessing(tmp_path):
    """A checkpoint's crop, mean/std and input size go into the file (--crop-pct overrides the crop: the slow CLI
    test below)."""
    import lightning as L
    from conftest import make_image_folder

    from pvt_lightning.data import ImageFolderDataModule
    from pvt_lightning.training.module import ImageClassifier

    data = make_image_folder(tmp_path / "data", classes=("blue", "green", "red"), per_class=2, size=(40, 36))
    preprocessing = dict(img_size=(32, 32), crop_pct=0.95, mean=(0.5, 0.45, 0.4), std=(0.2, 0.25, 0.3))
    torch.manual_seed(0)
    module = ImageClassifier(variant="b0", num_classes=3, class_names=["blue", "green", "red"], **preprocessing)
    datamodule = ImageFolderDataModule(data, batch_size=3, num_workers=0, **preprocessing)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=datamodule)
    checkpoint = tmp_path / "tiny.ckpt"
    trainer.save_checkpoint(checkpoint)

    meta = export_checkpoint(checkpoint, tmp_path / "own.pt2").metadata
    assert (meta.crop_pct, meta.mean, meta.std, meta.img_size) == (0.95, (0.5, 0.45, 0.4), (0.2, 0.25, 0.3), (32, 32))
    assert read_metadata(tmp_path / "own.pt2") == meta and meta.class_names == ("blue", "green", "red")


# --- predict from the export vs the checkpoint ------------------------------------------------------------------

TINY = ["--variant", "b0", "--img-size", "32", "32", "--num-workers", "0", "--precision", "32",
        "--accelerator", "cpu", "--limit-train-batches", "2", "--limit-val-batches", "1", "--epochs", "1",
        "--batch-size", "4"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(last.ckpt of a b0 trained 2 steps on real JPEGs, the image folder)."""
    from conftest import make_image_folder

    from pvt_lightning.cli.main import main as run

    root = tmp_path_factory.mktemp("trained")
    data = make_image_folder(root / "data", classes=("blue", "green", "red"), per_class=4, size=(48, 40))
    assert run([*TINY, "--data", str(data), "--logdir", str(root / "runs"), "--name", "tiny"]) == 0
    return root / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt", data


def read_predictions(path: Path) -> dict[str, tuple[str, float, list[tuple[str, float]]]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {r["path"]: (r["class"], float(r["probability"]),
            [(c.split(":")[0], float(c.split(":")[1])) for c in r["top5"].split(";")]) for r in rows}


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".onnx", ".pt2"])
def test_predict_from_export_equals_predict_from_checkpoint(trained, tmp_path, suffix):
    from pvt_lightning.cli.main import main as run

    checkpoint, data = trained
    exported_file = tmp_path / f"tiny{suffix}"
    result = export_checkpoint(checkpoint, exported_file, dynamic=True)
    assert result.metadata.class_names == ("blue", "green", "red") and result.metadata.img_size == (32, 32)
    common = ["--predict", str(data / "val"), "--num-workers", "0", "--accelerator", "cpu", "--batch-size", "5"]
    assert run([*common, "--checkpoint", str(checkpoint), "--output", str(tmp_path / "ckpt.csv")]) == 0
    assert run([*common, "--checkpoint", str(exported_file), "--output", str(tmp_path / "export.csv")]) == 0
    from_ckpt, from_export = read_predictions(tmp_path / "ckpt.csv"), read_predictions(tmp_path / "export.csv")
    assert len(from_ckpt) == 12 and from_ckpt.keys() == from_export.keys()
    for key, (cls, prob, top) in from_ckpt.items():
        other_cls, other_prob, other_top = from_export[key]
        assert other_cls == cls and abs(other_prob - prob) <= 1e-4
        assert [c for c, _ in other_top] == [c for c, _ in top]
        assert all(abs(p - q) <= 1.0001e-4 for (_, p), (_, q) in zip(top, other_top))  # 4 decimals in top5


# --- slow tier ------------------------------------------------------------------------------------------------

# Every variant to ONNX; to .pt2 only b2_li (linear SRA) and the ResNet: ONNX goes through the same torch.export
# trace, so a PVTv2 that exports to ONNX exports to .pt2 too (and b0, b2_li's .pt2 are read in the fast tier).
# b1-b5 differ from b0 and b2_li in their widths, MLP ratios and depth; they export with their own widths and MLP
# ratios but one block per stage (depth only repeats a block: b0 and b2_li, b2's depths with linear SRA, export
# at full depth; 5-6 minutes saved).
EVERY_VARIANT = [(name, "onnx") for name in VARIANTS] + [("b2_li", "exported-program"), ("resnet50", "exported-program")]
SHALLOW = {"b1", "b2", "b3", "b4", "b5"}


@pytest.mark.slow
@pytest.mark.parametrize("name, fmt", EVERY_VARIANT)
def test_every_variant_exports_dynamic(name, fmt, tmp_path):
    torch.manual_seed(0)
    depths = {"depths": (1, 1, 1, 1)} if name in SHALLOW else {}
    model = create_model(name, num_classes=10, **depths).eval()
    result = export_model(model, tmp_path / f"{name}{SUFFIX[fmt]}", dynamic=True)
    assert [c.size for c in result.checks] == SIZES and all(c.max_diff <= 1e-4 for c in result.checks)
    assert read_metadata(result.path) == result.metadata
    if fmt == "onnx":  # reading a deep .pt2 back takes b5 half a minute; the fast tier reads b0's and b2_li's
        with torch.inference_mode():
            x = torch.randn(1, 3, 288, 416)
            assert (load_exported(result.path)(x) - model(x)).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_cli_exports_a_trained_checkpoint(trained, tmp_path):
    checkpoint, _ = trained
    output = tmp_path / "tiny.onnx"
    script = str(ROOT / "experiments" / "export.py")
    done = subprocess.run([sys.executable, script, "--checkpoint", str(checkpoint), "--format", "onnx", "--output",
                           str(output), "--dynamic", "--crop-pct", "0.8"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert "parity vs eager at 192x32 (batch 1)" in done.stdout  # traced 32x32, then two more sizes
    meta = read_metadata(output)
    assert meta.class_names == ("blue", "green", "red") and meta.crop_pct == 0.8  # the flag over the checkpoint's
    again = subprocess.run([sys.executable, script, "--checkpoint", str(checkpoint), "--output", str(output)],
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "already exists" in again.stderr.strip().splitlines()[-1]


# --- experiments/benchmark.py --onnx ----------------------------------------------------------------------------

def load_benchmark_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_script", ROOT / "experiments" / "benchmark.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.mark.parametrize("flags, message", [
    (["--precision", "bf16-mixed"], "--onnx times fp32 inference only"),
    (["--onnx-batch-sizes", "0"], "--onnx-batch-sizes must be at least 1"),
])
def test_benchmark_onnx_bad_flags_exit_2(flags, message, capsys):
    status = load_benchmark_script().main(["--onnx", *flags, "--out", "/nonexistent/never-written"])
    assert status == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_benchmark_onnx_writes_complete_rows(tmp_path):
    onnx_dir = tmp_path / "exports"
    argv = [sys.executable, str(ROOT / "experiments" / "benchmark.py"), "--onnx", "--variants", "b0", "--sizes",
            "64x64", "96x64", "--onnx-batch-sizes", "1", "2", "--steps", "2", "--warmup", "1", "--threads", "1",
            "--onnx-profile", "--onnx-dir", str(onnx_dir), "--out", str(tmp_path), "--tag", "onnx"]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "onnx.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["size"], r["batch"]) for r in rows] == [("64x64", "1"), ("64x64", "2"), ("96x64", "1"), ("96x64", "2")]
    for row in rows:  # one dynamic export served both sizes and batches, and matched eager on the timed inputs
        assert row["provider"] == "CPU" and float(row["max_abs_diff"]) <= 1e-4
        assert float(row["ratio_lo"]) <= float(row["ratio"]) <= float(row["ratio_hi"])
        assert float(row["eager_img_s"]) > 0 and float(row["onnx_img_s"]) > 0
        shares = [float(part.rsplit(" ", 1)[1].rstrip("%")) for part in row["top_ops"].split("; ")]
        assert "Conv" in row["top_ops"] and shares == sorted(shares, reverse=True) and 50 <= sum(shares) <= 101
    assert [p.name for p in onnx_dir.iterdir()] == ["b0.onnx"]
    assert "load average" in (tmp_path / "onnx.md").read_text().splitlines()[0]
    again = subprocess.run(argv[:-2] + ["--tag", "again"], capture_output=True, text=True, cwd=ROOT, timeout=1800)
    assert again.returncode == 0, again.stderr
    with open(tmp_path / "again.csv") as f:
        assert all(r["export_s"] == "" for r in csv.DictReader(f))  # the export was reused
