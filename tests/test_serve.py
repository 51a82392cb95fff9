"""Serving over HTTP: the upload path preprocesses exactly as predict, and a real server process answers as predict.

Fast tier: the image pipeline against the prediction data loader on real JPEGs, the 4xx cases, the command line.
Slow tier: a real ``pvt-lightning serve`` process (LitServe, 127.0.0.1, a free port) for a b0 trained two steps,
queried by several client threads at once; its probabilities and decisions are compared with predict's CSV.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("litserve")

from pvt_lightning.cli.main import main  # noqa: E402
from pvt_lightning.models.registry import Preprocessing  # noqa: E402
from pvt_lightning.serve.preprocess import ImagePipeline, ImageRejected, normalize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--variant", "b0", "--img-size", "32", "32", "--num-workers", "0", "--precision", "32",
        "--accelerator", "cpu", "--limit-train-batches", "2", "--limit-val-batches", "1", "--epochs", "1",
        "--batch-size", "4"]


def png_declaring(width: int, height: int) -> bytes:
    """A small PNG whose header declares ``width`` x ``height`` (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# --- fast tier ------------------------------------------------------------------------------------------------

def test_pipeline_gives_the_prediction_loaders_crops(make_image_folder, tmp_path):
    from pvt_lightning.data import ImageFolderDataModule

    data = make_image_folder(tmp_path / "data", per_class=3, size=(57, 83))
    preprocessing = Preprocessing(img_size=(32, 48), crop_pct=0.9, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    module = ImageFolderDataModule.for_prediction(data / "val", img_size=(32, 48), batch_size=4, num_workers=0,
                                                  crop_pct=0.9, mean=preprocessing.mean, std=preprocessing.std)
    module.setup("predict")
    pipeline = ImagePipeline(preprocessing)
    seen = 0
    for images, paths in module.predict_dataloader():
        crops = torch.stack([torch.from_numpy(pipeline(Path(p).read_bytes(), p)) for p in paths])
        assert crops.dtype == torch.uint8 and torch.equal(crops, images)
        assert torch.equal(normalize(crops, preprocessing.mean, preprocessing.std), module.normalize(images))
        seen += len(paths)
    assert seen == 6


def test_pipeline_refuses_corrupt_and_oversized_images(image_folder):
    pipeline = ImagePipeline(Preprocessing(img_size=(32, 32)), max_pixels=10_000)
    good = next((image_folder / "val" / "a").iterdir()).read_bytes()
    assert pipeline(good).shape == (3, 32, 32)
    for data, status, words in [(good[: len(good) // 3], 400, "not a decodable image"), (b"", 400, "empty"),
                                (b"%PDF-1.4 not an image", 400, "not a decodable image"),
                                (png_declaring(200, 100), 413, "pixel budget")]:
        with pytest.raises(ImageRejected, match=words) as raised:
            pipeline(data)
        assert raised.value.status == status


@pytest.mark.parametrize("argv, message", [
    ([], "--checkpoint is required"),
    (["--checkpoint", "missing.ckpt"], "no such file"),
    (["--checkpoint", "model.txt"], "serve runs a training checkpoint"),
    (["--checkpoint", "x.ckpt", "--max-batch-size", "0"], "--max-batch-size 0"),
    (["--checkpoint", "x.ckpt", "--host", "example.com"], "--host example.com"),
])
def test_cli_mistakes_are_one_line_exit_2(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.txt").write_text("not a model")
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_not_a_checkpoint_is_refused_before_any_worker_starts(tmp_path, capsys):
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"definitely not a checkpoint")
    assert main(["serve", "--checkpoint", str(bad), "--port", "8123"]) == 2
    assert "model.ckpt" in capsys.readouterr().err


def test_top_level_entry_point_reaches_serve(capsys):
    from pvt_lightning.cli.main import main

    with pytest.raises(SystemExit) as done:
        main(["serve", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--max-batch-size" in out and "--workers-per-device" in out and "--lr" not in out


# --- a real server process --------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, data: bytes, content_type: str = "application/octet-stream") -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def multipart(field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


class Server:
    """``python -m pvt_lightning.cli serve ...`` in its own process group; stopped with SIGTERM, then killed."""

    def __init__(self, argv: list[str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        with open(log, "wb") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "pvt_lightning.cli", "serve", *argv, "--port",
                                             str(self.port), "--accelerator", "cpu", "--threads", "1"], cwd=ROOT,
                                            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        pytest.fail(f"the server did not answer /health within {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # any worker left behind
        except ProcessLookupError:
            pass
        return self.process.poll()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A b0 trained two steps on real JPEGs, its ONNX export, and an operating point for it."""
    from conftest import make_image_folder

    from pvt_lightning.cli.main import main as run
    from pvt_lightning.export.trace import export_checkpoint

    root = tmp_path_factory.mktemp("served")
    data = make_image_folder(root / "data", classes=("blue", "green", "red"), per_class=4, size=(48, 40))
    assert run([*TINY, "--data", str(data), "--logdir", str(root / "runs"), "--name", "tiny"]) == 0
    checkpoint = root / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    export_checkpoint(checkpoint, root / "tiny.onnx", dynamic=True)
    point = write_operating_point(checkpoint, data / "val", root / "operating_point.json")
    return {"data": data, "ckpt": checkpoint, "onnx": root / "tiny.onnx", "point": point}


@torch.inference_mode()
def write_operating_point(checkpoint: Path, folder: Path, path: Path, temperature: float = 1.5) -> Path:
    """Temperature 1.5; per class, a threshold in the widest gap between the val images' calibrated probabilities
    (so a 1e-7 difference between two runs cannot flip a decision), and one class never decided (None)."""
    from pvt_lightning.evaluation.operating_point import OperatingPoint
    from pvt_lightning.serve.model import load_model, model_info

    info = model_info(checkpoint)
    pipeline, model = ImagePipeline(info.preprocessing), load_model(checkpoint)
    crops = torch.stack([torch.from_numpy(pipeline(f.read_bytes())) for f in sorted(folder.rglob("*.jpg"))])
    probs = (model(normalize(crops, info.preprocessing.mean, info.preprocessing.std)) / temperature).softmax(-1)
    thresholds: dict[str, float | None] = {}
    for c, name in enumerate(info.class_names):
        values = probs[:, c].sort().values
        gap = int((values[1:] - values[:-1]).argmax())
        thresholds[name] = float(values[gap:gap + 2].mean()) if c < 2 else None
    path.write_text(OperatingPoint(temperature, thresholds, {"precision": 0.9}, "val", str(checkpoint)).to_json())
    return path


def predicted(model: Path, data: Path, point: Path, out: Path) -> dict[str, dict]:
    """predict's CSV rows by resolved path (with the operating point applied: prob_<class> columns and decision)."""
    from pvt_lightning.cli.main import main as run

    assert run(["--predict", str(data), "--checkpoint", str(model), "--operating-point", str(point), "--output",
                str(out), "--num-workers", "0", "--accelerator", "cpu", "--batch-size", "5"]) == 0
    with open(out, newline="") as f:
        return {str(Path(row["path"]).resolve()): row for row in csv.DictReader(f)}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ckpt", "onnx"])
def test_server_answers_as_predict_under_concurrent_clients(trained, kind, tmp_path):
    model, point = trained[kind], trained["point"]
    files = sorted((trained["data"] / "val").rglob("*.jpg"))
    classes = ["blue", "green", "red"]
    server = Server(["--checkpoint", str(model), "--operating-point", str(point), "--max-batch-size", "4",
                     "--batch-timeout", "0.05", "--max-upload-mb", "0.05"], tmp_path / "server.log")
    try:
        expected = predicted(model, trained["data"] / "val", point, tmp_path / "predictions.csv")
        server.wait_ready()

        def ask(index_file: tuple[int, Path]) -> tuple[Path, int, dict]:
            index, file = index_file
            if index % 2:
                return (file, *post(server.url + "/predict", *multipart("image", file.name, file.read_bytes())))
            return file, *post(server.url + "/predict", file.read_bytes(), "image/jpeg")

        with ThreadPoolExecutor(max_workers=6) as pool:
            answers = list(pool.map(ask, enumerate(files * 2)))
        assert len(answers) == 2 * len(files) == 24
        decisions = set()
        for file, status, answer in answers:
            assert status == 200, answer
            row = expected[str(file.resolve())]
            for name in classes:
                assert abs(answer["probabilities"][name] - float(row[f"prob_{name}"])) <= 1e-5
            assert answer["decision"] == row["decision"]
            decisions.add(row["decision"])
            assert answer["top"][0] == {"class": row["class"], "probability": answer["probabilities"][row["class"]]}
            assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert decisions <= {"blue", "green", "abstain"}  # red's threshold is None: never decided

        good = files[0].read_bytes()
        status, answer = post(server.url + "/predict", good[: len(good) // 2])
        assert status == 400 and "not a decodable image" in answer["detail"]
        status, answer = post(server.url + "/predict", good + bytes(60_000))
        assert status == 413 and "--max-upload-mb" in answer["detail"]
        status, answer = post(server.url + "/predict", png_declaring(40_000, 40_000))
        assert status == 413 and "pixel budget" in answer["detail"]
        status, answer = post(server.url + "/predict", *multipart("photo", "x.jpg", good))
        assert status == 422 and "'image'" in answer["detail"]
        status, answer = post(server.url + "/predict", good)  # still answering, same result
        assert status == 200 and answer["decision"] == expected[str(files[0].resolve())]["decision"]
        with urllib.request.urlopen(server.url + "/health", timeout=30) as health:
            assert health.status == 200
    finally:
        code = server.stop()
    assert code is not None and code != -signal.SIGKILL, server.log.read_text()[-2000:]
