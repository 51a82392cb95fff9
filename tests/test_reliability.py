"""Runs that die, diverge or are handed hostile files: each case is created for real and checked end to end."""

from __future__ import annotations

import argparse
import builtins
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from pvt_lightning.cli import main as cli
from pvt_lightning.runs.rundir import RUN_VERSION_ENV
from pvt_lightning.runs.checkpoint_io import AtomicCheckpointIO, atomic_torch_save
from pvt_lightning.training.reliability import explain_stops
from pvt_lightning.errors import EXIT_SIGTERM, EXIT_TRAINING_FAULT, RunStopped

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "experiments" / "run.py")]
# 3 classes x 4 images = 3 training batches of 4 per epoch: a checkpoint after step 1 or 2 is mid-epoch.
QUICK = ["--variant", "b0", "--img-size", "32", "32", "--batch-size", "4", "--num-workers", "0",
         "--precision", "32", "--accelerator", "cpu", "--data", "data", "--logdir", "runs"]
STEPS_PER_EPOCH, EPOCHS = 3, 2
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


needs_sigterm_senders = pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"),
                                           reason="loader workers cannot tell SIGTERM senders apart here")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*RUN, *args], cwd=cwd, capture_output=True, text=True, timeout=900, env=ENV)


def start_cli(*args: str, cwd: Path, new_session: bool = False) -> tuple[subprocess.Popen, list[str]]:
    """Start a run in the background; its merged stdout/stderr accumulates in the returned list."""
    proc = subprocess.Popen([*RUN, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV,
                            start_new_session=new_session)
    output: list[str] = []

    def pump() -> None:
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):
            output.append(chunk.decode(errors="replace"))

    threading.Thread(target=pump, daemon=True).start()
    return proc, output


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (status {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def optimizer_steps(checkpoint: dict) -> int:
    """Optimizer steps actually applied (AdamW's per-parameter step count)."""
    return int(next(iter(checkpoint["optimizer_states"][0]["state"].values()))["step"])


def summary(workspace: Path, name: str, version: int) -> dict:
    return json.loads((workspace / "runs" / name / f"version_{version}" / "summary.json").read_text())


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    from conftest import make_image_folder

    root = tmp_path_factory.mktemp("reliability")
    make_image_folder(root / "data", classes=("cat", "dog", "fox"), per_class=4, size=(40, 48))
    return root


@pytest.fixture(scope="module")
def reference(workspace) -> dict:
    """An uninterrupted run of the settings that the interrupted runs use."""
    proc = run_cli(*QUICK, "--epochs", str(EPOCHS), "--name", "reference", cwd=workspace)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = summary(workspace, "reference", 0)
    assert (result["global_step"], result["epochs"]) == (EPOCHS * STEPS_PER_EPOCH, EPOCHS)
    last = load(Path(result["checkpoints"]["last"]))
    result["optimizer_steps"] = optimizer_steps(last)
    result["scheduler_steps"] = last["lr_schedulers"][0]["last_epoch"]
    return result


def resume_and_compare(workspace: Path, name: str, reference: dict) -> None:
    """Resume ``name`` with --resume last; it must end where the uninterrupted run ended."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    proc = run_cli(*QUICK, "--epochs", str(EPOCHS), "--name", name, "--resume", "last", cwd=workspace)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = workspace / "runs" / name / "version_0"
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["version_0"], "resume continues the same folder"
    resumed = summary(workspace, name, 0)
    assert resumed["global_step"] == reference["global_step"]
    assert resumed["epochs"] == reference["epochs"]
    final = load(Path(resumed["checkpoints"]["last"]))
    assert optimizer_steps(final) == reference["optimizer_steps"]
    assert final["lr_schedulers"][0]["last_epoch"] == reference["scheduler_steps"]
    epochs_logged = []
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if "val/acc" in accumulator.Tags()["scalars"]:
            epochs_logged += [event.step for event in accumulator.Scalars("val/acc")]
    assert sorted(epochs_logged) == list(range(EPOCHS)), "one val/acc point per epoch across both event files"


# --- interrupted runs -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_ends_like_an_uninterrupted_run(workspace, reference):
    last = workspace / "runs" / "killed" / "version_0" / "checkpoints" / "last.ckpt"
    proc, _ = start_cli(*QUICK, "--epochs", str(EPOCHS), "--name", "killed", "--checkpoint-every-steps", "1",
                        cwd=workspace)
    wait_for(last.exists, proc, "the first periodic checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (last.parent.parent / "summary.json").exists()
    killed_at = load(last)["global_step"]  # the file is complete: weights_only loading parses all of it
    assert killed_at % STEPS_PER_EPOCH != 0, "the kill should land mid-epoch"
    resume_and_compare(workspace, "killed", reference)


@pytest.mark.slow
def test_sigterm_saves_last_checkpoint_and_says_how_to_resume(workspace, reference):
    # No periodic saves: whatever last.ckpt exists afterwards was written because of the SIGTERM.
    proc, output = start_cli(*QUICK, "--epochs", str(EPOCHS), "--name", "term", "--checkpoint-every-minutes", "0",
                             cwd=workspace)
    wait_for(lambda: "Epoch 0:" in "".join(output), proc, "training to start")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    text = "".join(output)
    last = workspace / "runs" / "term" / "version_0" / "checkpoints" / "last.ckpt"
    assert proc.returncode == EXIT_SIGTERM, text[-3000:]
    assert "received SIGTERM" in text and str(last) in text and "--resume last" in text
    assert "Traceback" not in text
    assert 0 < load(last)["global_step"] < reference["global_step"]
    resume_and_compare(workspace, "term", reference)


@pytest.mark.slow
@needs_sigterm_senders
def test_sigterm_to_the_whole_process_group_with_loader_workers_still_saves(workspace):
    """SLURM signals every process of the job, DataLoader workers included, not just the trainer."""
    args = [*QUICK, "--epochs", str(EPOCHS), "--name", "term_group", "--checkpoint-every-minutes", "0"]
    args[args.index("--num-workers") + 1] = "2"
    proc, output = start_cli(*args, cwd=workspace, new_session=True)
    wait_for(lambda: "Epoch 0:" in "".join(output), proc, "training to start")
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=300)
    text = "".join(output)
    assert proc.returncode == EXIT_SIGTERM, text[-3000:]
    assert "Traceback" not in text
    assert (workspace / "runs" / "term_group" / "version_0" / "checkpoints" / "last.ckpt").is_file()


@needs_sigterm_senders
@pytest.mark.slow
def test_loader_workers_outlive_a_foreign_sigterm_but_not_their_main_process():
    """A SIGTERM from another process (a scheduler's) leaves the worker serving; at interpreter exit the main
    process terminates its still-running persistent workers and waits, which must not hang."""
    code = (
        "import os, subprocess, time, torch\n"
        "from torch.utils.data import DataLoader, Dataset\n"
        "from pvt_lightning.data.dataset import worker_init\n"
        "class WorkerPids(Dataset):\n"
        "    def __len__(self): return 64\n"
        "    def __getitem__(self, i): return os.getpid()\n"
        "loader = DataLoader(WorkerPids(), batch_size=2, num_workers=1, persistent_workers=True,\n"
        "                    worker_init_fn=worker_init, multiprocessing_context='fork')\n"
        "batches = iter(loader)\n"
        "worker = int(next(batches)[0])\n"
        "subprocess.run(['kill', '-TERM', str(worker)], check=True)\n"
        "time.sleep(1)\n"
        "print('served after SIGTERM:', all(int(next(batches)[0]) == worker for _ in range(8)), flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "served after SIGTERM: True" in proc.stdout


def running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # an unreaped zombie has ended
    except psutil.NoSuchProcess:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_loader_workers_end_at_once_when_their_main_process_is_killed():
    """The main process is SIGKILLed (an OOM kill) while its workers start: they end too. PyTorch's own check
    reads the parent's pid once the worker loop starts, too late here: the orphans would wait forever, holding
    the pipes of whoever ran the main process (this test's subprocess.run, or pytest-xdist's controller)."""
    code = (
        "import os, signal, time, torch\n"
        "from torch.utils.data import DataLoader, Dataset\n"
        "from pvt_lightning.data.dataset import worker_init\n"
        "class WorkerPids(Dataset):\n"
        "    def __len__(self): return 64\n"
        "    def __getitem__(self, i): return os.getpid()\n"
        "def slow_start(worker_id):\n"
        "    worker_init(worker_id)\n"
        "    time.sleep(2)  # the main process dies meanwhile\n"
        "loader = DataLoader(WorkerPids(), batch_size=2, num_workers=2, worker_init_fn=slow_start,\n"
        "                    multiprocessing_context='fork')\n"
        "batches = iter(loader)\n"
        "print(*(worker.pid for worker in batches._workers), flush=True)\n"
        "time.sleep(0.5)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    workers = [int(pid) for pid in proc.stdout.split()]
    assert len(workers) == 2
    deadline = time.monotonic() + 8.0  # past the start-up sleep and PyTorch's 5 s poll
    while any(running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(running(pid) for pid in workers), "a loader worker outlived its killed main process"


def test_a_worker_never_frees_the_main_process_garbage(tmp_path):
    """An onnxruntime session left uncollected in a reference cycle when the loader forks: a collection inside the
    worker would run its destructor, which waits forever for the main process's thread-pool threads."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor("w", TensorProto.FLOAT, [4, 2], [0.5] * 8)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "m.onnx")
    code = (
        "import gc, sys, time, numpy as np, onnxruntime as ort\n"
        "from torch.utils.data import DataLoader, Dataset\n"
        "from pvt_lightning.data.dataset import worker_init\n"
        "class Cycle: pass\n"
        "garbage = Cycle(); garbage.me = garbage\n"
        "options = ort.SessionOptions(); options.intra_op_num_threads = 2\n"
        "garbage.session = ort.InferenceSession(sys.argv[1], options, providers=['CPUExecutionProvider'])\n"
        "garbage.session.run(None, {'x': np.ones((1, 4), np.float32)})\n"
        "time.sleep(0.5)  # its pool threads now wait on a condition variable\n"
        "del garbage\n"
        "class Collecting(Dataset):\n"
        "    def __len__(self): return 8\n"
        "    def __getitem__(self, i):\n"
        "        gc.collect()\n"
        "        return i\n"
        "loader = DataLoader(Collecting(), batch_size=4, num_workers=1, worker_init_fn=worker_init,\n"
        "                    multiprocessing_context='fork')\n"
        "print(sum(len(batch) for batch in loader), flush=True)\n"
    )
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.onnx")], cwd=ROOT, capture_output=True,
                              text=True, timeout=60, start_new_session=True)
    except subprocess.TimeoutExpired:
        pytest.fail("the loader worker hung freeing an onnxruntime session it inherited")
    assert proc.returncode == 0 and proc.stdout.split() == ["8"], proc.stderr[-3000:]


def test_a_failed_save_leaves_the_previous_checkpoint_and_no_temp_files(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")  # fails after the tensors before it were written

    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.zeros(1_000_000), "bad": Unpicklable()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert AtomicCheckpointIO().load_checkpoint(path)["step"] == 1


@pytest.mark.slow
def test_sigkill_during_saves_never_leaves_a_broken_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    for attempt in range(5):  # until a kill lands inside a save (its temp file is left behind)
        writer = subprocess.Popen([sys.executable, "-c", (
            "import sys, torch\n"
            "from pvt_lightning.runs.checkpoint_io import atomic_torch_save\n"
            "for step in range(10**6):\n"
            "    atomic_torch_save({'step': step, 'w': torch.full((4_000_000,), float(step))}, sys.argv[1])\n"
            "    print(step, flush=True)\n"
        ), str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        writer.stdout.readline()  # one save finished; the loop spends nearly all its time in the next ones
        time.sleep(0.1 + 0.1 * attempt)
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)
        if list(tmp_path.glob(".last.ckpt.*.tmp")):
            break
    assert list(tmp_path.glob(".last.ckpt.*.tmp")), "no kill landed during a save"
    checkpoint = load(path)
    assert checkpoint["step"] >= 0 and bool((checkpoint["w"] == checkpoint["step"]).all())


# --- numerical faults ---------------------------------------------------------------------------------

def test_nan_loss_stops_with_the_step_and_fixes_and_keeps_the_last_good_checkpoint(workspace, monkeypatch, capsys):
    # Step 0 trains normally; step 1's loss is NaN (as a diverging learning rate makes it; --lr is capped at 10,
    # too low to diverge this tiny model in one step). Time-based saves every few milliseconds: last.ckpt after
    # step 0 exists only if they work.
    from pvt_lightning.training.module import ImageClassifier

    real_step = ImageClassifier.training_step

    def diverging_step(self, batch, batch_idx):
        loss = real_step(self, batch, batch_idx)
        return loss * float("nan") if self.global_step == 1 else loss

    monkeypatch.setattr(ImageClassifier, "training_step", diverging_step)
    monkeypatch.setenv(RUN_VERSION_ENV, "0")
    monkeypatch.chdir(workspace)
    status = cli.main([*QUICK, "--epochs", str(EPOCHS), "--name", "nan", "--warmup-epochs", "0",
                       "--checkpoint-every-minutes", "0.0001"])
    checkpoints = workspace / "runs" / "nan" / "version_0" / "checkpoints"
    err = capsys.readouterr().err
    assert status == EXIT_TRAINING_FAULT, err[-3000:]
    assert "Traceback" not in err
    message = err.strip().splitlines()[-1]
    assert "training loss is nan at epoch 0, global step 1" in message
    assert "--lr" in message and "--grad-clip 1.0" in message and str(checkpoints / "last.ckpt") in message
    # last.ckpt is the state before the NaN step, not the broken one after it.
    assert [p.name for p in checkpoints.iterdir()] == ["last.ckpt"]
    last = load(checkpoints / "last.ckpt")
    assert last["global_step"] == 1
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values() if t.is_floating_point())
    assert not (checkpoints.parent / "summary.json").exists()


def test_out_of_memory_suggests_smaller_batch_checkpointing_and_bf16(workspace, monkeypatch, capsys):
    def out_of_memory(self, batch, batch_idx):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("pvt_lightning.training.module.ImageClassifier.training_step", out_of_memory)
    monkeypatch.setenv(RUN_VERSION_ENV, "0")
    monkeypatch.chdir(workspace)
    status = cli.main([*QUICK, "--epochs", "1", "--batch-size", "6", "--name", "oom"])
    message = capsys.readouterr().err
    assert status == EXIT_TRAINING_FAULT
    assert "out of memory" in message and "--batch-size (now 6; try 3)" in message
    assert "--grad-checkpointing" in message and "--precision bf16-mixed" in message


def test_out_of_memory_advice_drops_what_is_already_on():
    args = argparse.Namespace(batch_size=1, variant="b5", grad_checkpointing=True, precision="bf16-mixed")
    with pytest.raises(RunStopped) as stopped, explain_stops(trainer=None, args=args):
        raise torch.OutOfMemoryError("CUDA out of memory")
    assert stopped.value.exit_code == EXIT_TRAINING_FAULT
    assert str(stopped.value) == "out of memory on the device. Try a smaller --img-size."


@pytest.mark.parametrize("flag", ["--checkpoint-every-steps", "--checkpoint-every-minutes"])
def test_negative_checkpoint_interval_is_a_usage_error(flag, capsys):
    assert cli.main([flag, "-1", "--data", "."]) == 2
    assert f"{flag} -1: not allowed" in capsys.readouterr().err


def test_internal_errors_keep_their_traceback(workspace, monkeypatch):
    def bug(self, batch, batch_idx):
        raise ZeroDivisionError("a bug in our code")

    monkeypatch.setattr("pvt_lightning.training.module.ImageClassifier.training_step", bug)
    monkeypatch.setenv(RUN_VERSION_ENV, "0")
    monkeypatch.chdir(workspace)
    with pytest.raises(ZeroDivisionError, match="a bug in our code"):
        cli.main([*QUICK, "--epochs", "1", "--name", "bug"])


# --- untrusted files ----------------------------------------------------------------------------------

class _Payload:
    """Unpickling this runs ``open(marker, 'w')``: a stand-in for any code an attacker would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def booby_trapped_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint shaped like ours, with a payload among its hyper-parameters."""
    torch.save({"state_dict": {"model.head.weight": torch.zeros(3, 4)}, "global_step": 0, "epoch": 0,
                "hyper_parameters": {"variant": "b0", "num_classes": 3, "evil": _Payload(marker)}}, path)
    return path


def test_the_booby_trap_is_real(tmp_path):
    marker = tmp_path / "pwned"
    trap = booby_trapped_checkpoint(tmp_path / "trap.ckpt", marker)
    torch.load(trap, weights_only=False)  # what an unsafe loader would do
    assert marker.exists()


TRAP_FLAGS = ["--resume", "--resume last", "--evaluate", "--checkpoint", "--pretrained"]


def trap_command(workspace: Path, flag: str, how: str) -> tuple[list[str], Path]:
    """The command line that hands a fresh booby-trapped file to ``flag``, and the file its payload would create."""
    slug = f"{how}_{flag.strip('-').replace(' ', '_')}"
    marker = workspace / f"pwned_{slug}"
    trap = booby_trapped_checkpoint(workspace / f"trap_{slug}.ckpt", marker)
    if flag == "--resume last":
        last = workspace / "runs" / f"trapped_{slug}" / "version_0" / "checkpoints" / "last.ckpt"
        last.parent.mkdir(parents=True)
        trap.rename(last)
        args = [*QUICK, "--resume", "last"]
    elif flag == "--checkpoint":
        args = ["--predict", "data/val", "--checkpoint", str(trap), "--num-workers", "0"]
    elif flag == "--evaluate":
        args = ["--evaluate", str(trap), "--data", "data", "--num-workers", "0"]
    else:
        args = [*QUICK, flag, str(trap)]
    if flag in ("--checkpoint", "--evaluate"):  # evaluate and predict make no run folder: no --name
        return args, marker
    return [*args, "--name", f"trapped_{slug}"], marker


@pytest.mark.parametrize("flag", TRAP_FLAGS)
def test_booby_trapped_pickle_is_refused_by_every_flag(workspace, flag, monkeypatch, capsys):
    args, marker = trap_command(workspace, flag, "main")
    monkeypatch.setenv(RUN_VERSION_ENV, "0")
    monkeypatch.chdir(workspace)
    assert cli.main(args) == 2
    assert "refused to load" in capsys.readouterr().err
    assert not marker.exists(), "the payload ran"


@pytest.mark.slow
@pytest.mark.parametrize("flag", TRAP_FLAGS)
def test_booby_trapped_pickle_via_the_command_line_exits_2_without_traceback(workspace, flag):
    args, marker = trap_command(workspace, flag, "cli")
    proc = run_cli(*args, cwd=workspace)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("pvt-lightning: error: refused to load")
    assert "Traceback" not in proc.stderr
    assert not marker.exists(), "the payload ran"


def test_truncated_resume_checkpoint_is_a_clear_error(workspace, monkeypatch, capsys):
    good = workspace / "whole.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "epoch": 0}, good)
    broken = workspace / "truncated.ckpt"
    broken.write_bytes(good.read_bytes()[:600])
    monkeypatch.setenv(RUN_VERSION_ENV, "0")
    monkeypatch.chdir(workspace)
    assert cli.main([*QUICK, "--resume", str(broken), "--name", "truncated"]) == 2
    err = capsys.readouterr().err
    assert "truncated.ckpt" in err and "cannot read" in err


def test_atomic_save_sweeps_stale_temp_files_and_keeps_the_usual_mode(tmp_path):
    stale = tmp_path / ".last.ckpt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    atomic_torch_save({"x": torch.ones(2)}, tmp_path / "last.ckpt")
    assert not stale.exists()
    reference = tmp_path / "plain.pt"
    torch.save({"x": torch.ones(2)}, reference)
    assert (tmp_path / "last.ckpt").stat().st_mode & 0o777 == reference.stat().st_mode & 0o777
