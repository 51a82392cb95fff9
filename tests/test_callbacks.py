"""Epoch-level callbacks: real trainings on tiny JPEG folders, read back from the TensorBoard events.

Run as a script (``python tests/test_callbacks.py DATA LOGDIR NAME``) it trains under 2-process
DDP on CPU; the slow test below does that, because Lightning's DDP launcher re-runs the script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from sklearn.metrics import precision_recall_curve, precision_recall_fscore_support
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from pvt_lightning import ImageClassifier
from pvt_lightning.tags import CUDA_MEMORY_TAGS
from pvt_lightning.training.callbacks import default_callbacks
from pvt_lightning.training.callbacks.epoch_line import EpochLine, format_epoch_line
from pvt_lightning.training.callbacks.memory import (CudaPeakMemory, MemoryMonitor, process_tree_pss,
                                                     proportional_set_size, worst_rank)
from pvt_lightning.training.callbacks.timing import EpochTimer

CLASSES = ("blue", "green", "red")
COLOURS = {"blue": (30, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40)}
IMG_SIZE = 32
BATCH_SIZE = 4
TRAIN_BATCHES = 2
EPOCHS = 2
POSITIVE, THRESHOLD = "red", 0.4
EPOCH_TAGS = ("time/epoch_s", "throughput/train_img_s", "memory/peak_pss_mb",
              *(f"val/{m}/{c}" for m in ("precision", "recall") for c in CLASSES))
MODULE_EPOCH_TAGS = ("train/loss", "train/lr", "val/loss", "val/acc", "val/acc5", "val/precision", "val/recall",
                     "val/f1")


MISLEADING_VAL_IMAGES = {("blue", 0): "green", ("green", 0): "red", ("green", 1): "red"}
"""Validation images drawn in another class's colour, so per-class precision and recall differ from 1 and each other."""


def write_jpeg_folder(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """Class folders of real JPEGs: a class colour with noise and a random dark square."""
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                colour = COLOURS[MISLEADING_VAL_IMAGES.get((name, i), name) if split == "val" else name]
                pixels = np.clip(np.array(colour) + rng.normal(0, 40, (IMG_SIZE, IMG_SIZE, 3)), 0, 255)
                y, x = rng.integers(0, IMG_SIZE - 8, 2)
                pixels[y:y + 8, x:x + 8] = 20
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)
    return root


def loader(folder: Path, shuffle: bool) -> DataLoader:
    return DataLoader(datasets.ImageFolder(str(folder), transform=transforms.ToTensor()), batch_size=BATCH_SIZE,
                      shuffle=shuffle, num_workers=0)


def train_tiny(data: Path, logdir: Path, name: str, linear_sra: bool, positive_class: str | None = None,
               **trainer_kwargs) -> tuple[L.Trainer, ImageClassifier, list[L.Callback]]:
    """Two short epochs of b0 on the folder, with the default callbacks and a real TensorBoard logger."""
    L.seed_everything(0, verbose=False)
    model = ImageClassifier("b0", num_classes=len(CLASSES), class_names=CLASSES, img_size=(IMG_SIZE, IMG_SIZE),
                            lr=1e-3, warmup_epochs=0, linear_sra=linear_sra)
    callbacks = default_callbacks(CLASSES, positive_class=positive_class, threshold=THRESHOLD)
    trainer = L.Trainer(
        max_epochs=EPOCHS, limit_train_batches=TRAIN_BATCHES, accelerator="cpu", log_every_n_steps=1,
        logger=TensorBoardLogger(str(logdir), name=name, default_hp_metric=False), callbacks=callbacks,
        enable_checkpointing=False, enable_model_summary=False, **trainer_kwargs,
    )
    trainer.fit(model, loader(data / "train", shuffle=True), loader(data / "val", shuffle=False))
    return trainer, model, callbacks


def events(run_dir: Path) -> EventAccumulator:
    return EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0}).Reload()


def scalar_steps(acc: EventAccumulator, tag: str) -> list[int]:
    return [event.step for event in acc.Scalars(tag)]


def last_scalar(acc: EventAccumulator, tag: str) -> float:
    return acc.Scalars(tag)[-1].value


def hparams_of(acc: EventAccumulator) -> tuple[dict, list[str]]:
    """The HParams plugin's view of a run: hyperparameter values and metric tags."""
    content = acc.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    values = {}
    for key, value in session.session_start_info.hparams.items():
        kind = value.WhichOneof("kind")
        values[key] = getattr(value, kind)
    return values, [info.name.tag for info in experiment.experiment.metric_infos]


@torch.no_grad()
def direct_predictions(model: ImageClassifier, val_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and targets of the final model over the whole validation folder."""
    model.eval()
    probs, targets = [], []
    for images, target in loader(val_dir, shuffle=False):
        probs.append(model(images).softmax(-1))
        targets.append(target)
    return torch.cat(probs).numpy(), torch.cat(targets).numpy()


def assert_metrics_match_direct(acc: EventAccumulator, model: ImageClassifier, val_dir: Path,
                                positive_class: str | None = None) -> None:
    """Logged per-class and macro precision/recall of the last epoch equal sklearn over the whole val set."""
    probs, targets = direct_predictions(model, val_dir)
    predicted = probs.argmax(1)
    assert (predicted != targets).any(), "a perfect model would hide metrics computed on one shard only"
    precision, recall, _, _ = precision_recall_fscore_support(targets, predicted, labels=range(len(CLASSES)),
                                                              zero_division=0)
    for i, name in enumerate(CLASSES):
        assert last_scalar(acc, f"val/precision/{name}") == pytest.approx(precision[i], abs=1e-6)
        assert last_scalar(acc, f"val/recall/{name}") == pytest.approx(recall[i], abs=1e-6)
    macro_p, macro_r, _, _ = precision_recall_fscore_support(targets, predicted, average="macro", zero_division=0)
    assert last_scalar(acc, "val/precision") == pytest.approx(macro_p, abs=1e-6)
    assert last_scalar(acc, "val/recall") == pytest.approx(macro_r, abs=1e-6)
    assert last_scalar(acc, "val/acc") == pytest.approx((predicted == targets).mean(), abs=1e-6)
    # Recall at precision 0.9, one-vs-rest per class: the highest recall on scikit-learn's curve with precision >= 0.9.
    at_precision = []
    for i, name in enumerate(CLASSES):
        p, r, _ = precision_recall_curve(targets == i, probs[:, i])
        at_precision.append(r[p >= 0.9].max())
        assert last_scalar(acc, f"val/recall@precision0.90/{name}") == pytest.approx(at_precision[-1], abs=1e-6)
    assert last_scalar(acc, "val/recall@precision0.90") == pytest.approx(np.mean(at_precision), abs=1e-6)
    assert last_scalar(acc, "val/unreached@precision0.90") == sum(value == 0 for value in at_precision)
    if positive_class is not None:
        index = CLASSES.index(positive_class)
        is_positive = (targets == index).astype(int)
        says_positive = (probs[:, index] > THRESHOLD).astype(int)
        p, r, _, _ = precision_recall_fscore_support(is_positive, says_positive, average="binary", zero_division=0)
        assert last_scalar(acc, f"val/positive/precision/{positive_class}") == pytest.approx(p, abs=1e-6)
        assert last_scalar(acc, f"val/positive/recall/{positive_class}") == pytest.approx(r, abs=1e-6)


# --- the parts that need no training --------------------------------------------------------------

def test_worst_rank_logs_the_fullest_device_per_tag():
    """The CUDA path's reduction, fed numbers as all_gather returns them (one row per rank)."""
    per_rank = [[2048.0, 1200.0], [1900.0, 1500.0]]  # (reserved, allocated): CUDA_MEMORY_TAGS' order
    assert worst_rank(CUDA_MEMORY_TAGS, per_rank) == {
        "memory/peak_allocated_mb": 1500.0, "memory/peak_reserved_mb": 2048.0}
    assert worst_rank(CUDA_MEMORY_TAGS, [[20.0, 10.0]]) == {
        "memory/peak_allocated_mb": 10.0, "memory/peak_reserved_mb": 20.0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_memory_sees_an_allocation_and_resets():
    probe = CudaPeakMemory(torch.device("cuda", 0))
    probe.start()
    block = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    reserved, allocated = probe.stop()
    assert allocated >= 256 and reserved >= allocated
    del block
    torch.cuda.empty_cache()
    probe.start()
    assert probe.stop()[1] < 256


@pytest.mark.slow
def test_process_tree_pss_counts_children_and_skips_other_ranks():
    """A child holding 200 MB is counted (as data-loader workers are) unless its pid is skipped (another rank)."""
    import psutil

    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        block = bytearray(200 * 2**20)
        print("ready", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        me = psutil.Process()
        with_child = process_tree_pss(me)
        without_child = process_tree_pss(me, frozenset({child.pid}))
        assert with_child - without_child > 150 * 2**20
        assert without_child >= me.memory_full_info().uss  # at least this process's own pages
    finally:
        child.kill()
        child.wait()


def test_epoch_line_reads_like_the_issue():
    metrics = {"train/loss": 0.8123, "val/acc": 0.912, "val/precision": 0.905, "val/recall": 0.899, "val/f1": 0.901}
    line = format_epoch_line(2, 10, metrics, 41.24, 38.71, {"memory/peak_pss_mb": 1830.4})
    assert line == ("epoch 3/10 | train loss 0.812 | val acc 0.912 P 0.905 R 0.899 F1 0.901 | 41.2 s, 38.7 img/s"
                    " | peak PSS 1830 MB")


def test_unknown_positive_class_is_a_clear_error():
    with pytest.raises(ValueError, match="'cat' is not one of the classes"):
        default_callbacks(CLASSES, positive_class="cat")


# --- two real trainings: linear SRA off (with a positive class) and on ------------------------------

@pytest.fixture(scope="module")
def jpeg_data(tmp_path_factory) -> Path:
    return write_jpeg_folder(tmp_path_factory.mktemp("data"), {"train": 6, "val": 4})


@pytest.fixture(scope="module")
def trained_runs(jpeg_data, tmp_path_factory):
    logdir = tmp_path_factory.mktemp("runs")
    runs = {}
    for name, linear_sra, positive in (("b0_32x32", False, POSITIVE), ("b0_li_32x32", True, None)):
        trainer, model, callbacks = train_tiny(jpeg_data, logdir, name, linear_sra, positive_class=positive)
        runs[name] = (trainer, model, callbacks, Path(trainer.logger.log_dir))
    return runs


@pytest.mark.parametrize("name", ["b0_32x32", "b0_li_32x32"])
def test_every_epoch_tag_has_one_value_per_epoch(trained_runs, name):
    *_, run_dir = trained_runs[name]
    acc = events(run_dir)
    tags = set(acc.Tags()["scalars"])
    for tag in EPOCH_TAGS:
        assert scalar_steps(acc, tag) == list(range(EPOCHS)), tag
    for tag in MODULE_EPOCH_TAGS:
        assert len(acc.Scalars(tag)) == EPOCHS, tag
    assert not any(tag.startswith("memory/peak_allocated") for tag in tags)  # CPU run: RSS, not CUDA tags
    assert all(event.value > 0 for event in acc.Scalars("memory/peak_pss_mb"))
    assert acc.Tags()["images"] == ["val/confusion_matrix"]
    assert len(acc.Images("val/confusion_matrix")) == EPOCHS
    pr_curves = [tag for tag in acc.Tags()["tensors"] if tag.startswith("val/pr_curve/")]
    assert sorted(pr_curves) == [f"val/pr_curve/{c}" for c in CLASSES]
    assert [event.step for event in acc.Tensors("val/pr_curve/red")] == list(range(EPOCHS))


def assert_pr_counts_cover_the_validation_set(acc: EventAccumulator) -> None:
    """At threshold 0 every image is called positive: TP = the class's 4 images, FP = the other 8."""
    for name in CLASSES:
        curve = np.array(acc.Tensors(f"val/pr_curve/{name}")[-1].tensor_proto.float_val).reshape(6, -1)
        tp, fp, tn, fn = curve[:4, 0]  # rows: TP, FP, TN, FN, precision, recall; columns: thresholds 0..1
        assert (tp, fp, tn, fn) == (4, 8, 0, 0), name


def test_pr_curve_counts_cover_the_whole_validation_set(trained_runs):
    *_, run_dir = trained_runs["b0_32x32"]
    assert_pr_counts_cover_the_validation_set(events(run_dir))


def test_precision_recall_equal_a_direct_computation(trained_runs, jpeg_data):
    trainer, model, *_ , run_dir = trained_runs["b0_32x32"]
    assert_metrics_match_direct(events(run_dir), model, jpeg_data / "val", positive_class=POSITIVE)
    trainer, model, *_, run_dir = trained_runs["b0_li_32x32"]
    assert_metrics_match_direct(events(run_dir), model, jpeg_data / "val")


@pytest.mark.parametrize("name,linear_sra", [("b0_32x32", False), ("b0_li_32x32", True)])
def test_hparams_tab_lists_the_run_and_its_final_metrics(trained_runs, name, linear_sra):
    *_, run_dir = trained_runs[name]
    values, metric_tags = hparams_of(events(run_dir))
    assert values["variant"] == "b0"
    assert values["linear_sra"] == ("true" if linear_sra else "false")
    assert values["img_size"] == "32x32"
    assert values["batch_size"] == BATCH_SIZE
    assert values["lr"] == pytest.approx(1e-3)
    assert values["precision"] == "32-true"
    assert "class_names" not in values
    assert {"val/acc", "val/precision", "val/recall", "time/epoch_s", "memory/peak_pss_mb"} <= set(metric_tags)
    if name == "b0_32x32":
        assert values["positive_class"] == POSITIVE
        assert "val/positive/recall/red" in metric_tags


def test_time_and_throughput_count_only_training_images(trained_runs):
    trainer, _, callbacks, run_dir = trained_runs["b0_32x32"]
    timer = next(c for c in callbacks if isinstance(c, EpochTimer))
    acc = events(run_dir)
    times = [e.value for e in acc.Scalars("time/epoch_s")]
    rates = [e.value for e in acc.Scalars("throughput/train_img_s")]
    assert times == pytest.approx(timer.epoch_times_s) and rates == pytest.approx(timer.throughputs_img_s)
    for seconds, rate in zip(times, rates):
        assert seconds > 0
        assert seconds * rate == pytest.approx(TRAIN_BATCHES * BATCH_SIZE, rel=1e-4)  # 12 val images not counted


class SlowImages(torch.utils.data.Dataset):
    """Decodes the folder like ImageFolder, taking at least ``delay_s`` per image."""

    def __init__(self, folder: Path, delay_s: float):
        self.images = datasets.ImageFolder(str(folder), transform=transforms.ToTensor())
        self.delay_s = delay_s

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        time.sleep(self.delay_s)
        return self.images[index]


class EpochWallClock(L.Callback):
    """Wall time from training-epoch start to end, validation included."""

    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start


def test_epoch_time_leaves_validation_out(jpeg_data, tmp_path):
    """Validation sleeps at least 12 x 0.1 s inside the epoch; the logged epoch time must not contain it."""
    model = ImageClassifier("b0", num_classes=len(CLASSES), class_names=CLASSES, img_size=(IMG_SIZE, IMG_SIZE))
    timer, wall = EpochTimer(), EpochWallClock()
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, num_sanity_val_steps=0, accelerator="cpu",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[wall, timer])
    slow_val = DataLoader(SlowImages(jpeg_data / "val", delay_s=0.1), batch_size=BATCH_SIZE)
    trainer.fit(model, loader(jpeg_data / "train", shuffle=True), slow_val)
    validation_s = 12 * 0.1
    assert wall.seconds > validation_s
    assert 0 < timer.epoch_times_s[0] < wall.seconds - 0.5 * validation_s


def test_callback_attributes_for_the_summary(trained_runs):
    _, _, callbacks, run_dir = trained_runs["b0_li_32x32"]
    memory = next(c for c in callbacks if isinstance(c, MemoryMonitor))
    assert memory.memory_device == "cpu"
    assert len(memory.peaks_mb) == EPOCHS and all(peak > 50 for peak in memory.peaks_mb)
    assert memory.peaks_mb == pytest.approx([e.value for e in events(run_dir).Scalars("memory/peak_pss_mb")])


def test_inference_speed_is_measured_at_the_end_of_training(trained_runs):
    from pvt_lightning.training.callbacks.inference import InferenceSpeed
    from pvt_lightning.training.inference_speed import INFERENCE_FIELDS

    _, _, callbacks, _ = trained_runs["b0_32x32"]
    result = next(c for c in callbacks if isinstance(c, InferenceSpeed)).result
    assert tuple(result) == INFERENCE_FIELDS
    assert result["batch_size"] == BATCH_SIZE and result["img_size"] == [IMG_SIZE, IMG_SIZE]  # the training batch
    assert result["precision"] == "32-true" and result["device"].startswith("cpu")
    assert result["img_s"] > 0 and result["batch1_img_s"] > 0
    assert 0 < result["latency_ms_p50"] <= result["latency_ms_p90"]


def test_one_epoch_line_per_epoch(trained_runs):
    _, _, callbacks, _ = trained_runs["b0_32x32"]
    line = next(c for c in callbacks if isinstance(c, EpochLine))
    assert len(line.lines) == EPOCHS
    assert line.lines[-1].startswith(f"epoch {EPOCHS}/{EPOCHS} | train loss ")
    assert " | val acc " in line.lines[-1] and "img/s | peak PSS " in line.lines[-1]


# --- the same under 2-process DDP on CPU -------------------------------------------------------------

@pytest.mark.slow
def test_ddp_metrics_cover_both_ranks(jpeg_data, tmp_path):
    logdir = tmp_path / "runs"
    script = Path(__file__).resolve()
    env = {**os.environ, "PYTHONPATH": str(script.parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, str(script), str(jpeg_data), str(logdir), "ddp"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((logdir / "ddp_result.json").read_text())
    run_dir = Path(result["run_dir"])
    acc = events(run_dir)
    for tag in EPOCH_TAGS:
        assert scalar_steps(acc, tag) == list(range(EPOCHS)), tag
    model = ImageClassifier("b0", num_classes=len(CLASSES), class_names=CLASSES, img_size=(IMG_SIZE, IMG_SIZE))
    model.load_state_dict(torch.load(logdir / "final.pt", weights_only=True))
    assert_metrics_match_direct(acc, model, jpeg_data / "val", positive_class=POSITIVE)
    assert_pr_counts_cover_the_validation_set(acc)
    # 2 ranks x TRAIN_BATCHES x BATCH_SIZE images per epoch, at the slowest rank's time
    for seconds, rate in zip(result["epoch_times_s"], result["throughputs_img_s"]):
        assert seconds * rate == pytest.approx(2 * TRAIN_BATCHES * BATCH_SIZE, rel=1e-4)
    assert all(peak > 50 for peak in result["peaks_mb"])
    assert sum("| val acc " in line for line in done.stdout.splitlines()) == EPOCHS  # rank 0 only


def main_ddp(data: Path, logdir: Path, name: str) -> None:
    trainer, model, callbacks = train_tiny(data, logdir, name, linear_sra=False, positive_class=POSITIVE,
                                           devices=2, strategy="ddp")
    if trainer.is_global_zero:
        timer = next(c for c in callbacks if isinstance(c, EpochTimer))
        memory = next(c for c in callbacks if isinstance(c, MemoryMonitor))
        torch.save(model.state_dict(), logdir / "final.pt")
        (logdir / "ddp_result.json").write_text(json.dumps({
            "run_dir": trainer.logger.log_dir, "epoch_times_s": timer.epoch_times_s,
            "throughputs_img_s": timer.throughputs_img_s, "peaks_mb": memory.peaks_mb,
        }))


if __name__ == "__main__":
    main_ddp(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])


def test_proportional_set_size_counts_shared_pages_once():
    """PSS is at most RSS (shared pages are split between the processes sharing them) and never zero."""
    import psutil

    me = psutil.Process()
    pss = proportional_set_size(me.pid)
    assert 0 < pss <= me.memory_info().rss
    assert process_tree_pss(me) >= 0.98 * pss  # read a moment later: the process's own pages may have moved
