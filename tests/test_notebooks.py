"""The notebooks: stored without outputs, and each one runs top to bottom in a real Jupyter kernel.

The execution tests run every notebook under ``notebooks/`` with papermill (``smoke=True``) in a
``python3`` kernel of this interpreter, and check it finished without errors and drew its figures.
"""

from __future__ import annotations

import os
import re
import struct
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Figures each notebook must write into its out_dir in a smoke run (and show inline).
EXPECTED_FIGURES = {
    "linear_sra_ablation.ipynb": ("complexity.png", "throughput.png", "memory.png", "gain.png",
                                  "training_curves.png", "loss_curves.png"),
    "compare_runs.ipynb": ("metrics.png", "loss.png", "speed.png", "memory.png", "recall_vs_speed.png"),
}


def test_notebooks_found():
    assert {path.name for path in NOTEBOOKS} >= set(EXPECTED_FIGURES), NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path: Path):
    """Outputs and execution counts are stripped before commit (nbstripout, see .pre-commit-config.yaml)."""
    book = nbformat.read(path, as_version=4)
    dirty = [i for i, cell in enumerate(book.cells) if cell.cell_type == "code"
             and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: code cells {dirty} carry outputs or execution counts; strip them with "
                       f"`nbstripout {path.relative_to(ROOT)}` (or `pre-commit install` once)")
    assert "widgets" not in book.metadata and "papermill" not in book.metadata, f"{path.name}: run metadata stored"
    assert not any("papermill" in cell.metadata or "execution" in cell.metadata for cell in book.cells), \
        f"{path.name}: cells carry run metadata (papermill timings); save the notebook before running it, not after"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_papermill_parameters(path: Path):
    book = nbformat.read(path, as_version=4)
    tagged = [cell for cell in book.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"
    assert "smoke = False" in tagged[0].source


@pytest.fixture
def python3_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A ``python3`` kernelspec that runs this very interpreter, found first on JUPYTER_PATH.

    So the notebooks run against this checkout and these packages even if another ``python3``
    kernel is installed for the user (CI installs one with ``python -m ipykernel install --user``).
    """
    from ipykernel.kernelspec import write_kernel_spec

    kernels = tmp_path / "jupyter" / "kernels"
    kernels.mkdir(parents=True)
    write_kernel_spec(str(kernels / "python3"), overrides={"argv": [sys.executable, "-m", "ipykernel_launcher", "-f",
                                                                    "{connection_file}"]})
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join([str(tmp_path / "jupyter"), os.environ.get("JUPYTER_PATH", "")]))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    assert spec.argv[0] == sys.executable, spec.argv
    return "python3"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG file's IHDR chunk; fails on anything that is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG file"
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_in_a_kernel(path: Path, tmp_path: Path, python3_kernel: str):
    """smoke=True: the whole notebook runs in a Jupyter kernel, without errors, and draws every figure."""
    import papermill

    work = tmp_path / "work"
    work.mkdir()
    out_dir = tmp_path / "out"
    executed = tmp_path / path.name
    papermill.execute_notebook(str(path), str(executed), parameters={"smoke": True, "out_dir": str(out_dir)},
                               kernel_name=python3_kernel, cwd=str(work), progress_bar=False)

    book = nbformat.read(executed, as_version=4)
    errors = [output for cell in book.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
              if output.get("output_type") == "error"]
    assert not errors, errors
    assert all(cell.get("execution_count") for cell in book.cells if cell.cell_type == "code"), "a cell did not run"

    for name in EXPECTED_FIGURES[path.name]:
        figure = out_dir / name
        assert figure.is_file(), f"{path.name} did not write {name}"
        width, height = png_size(figure)
        assert width >= 300 and height >= 200, (name, width, height)
        assert figure.stat().st_size > 10_000, f"{name} is suspiciously small: an empty plot?"
    shown = [output for cell in book.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
             if "image/png" in output.get("data", {})]
    assert len(shown) >= len(EXPECTED_FIGURES[path.name]), f"{len(shown)} figures shown inline"
    assert list(work.iterdir()) == [] or all(p.name.startswith(".") for p in work.iterdir()), \
        f"{path.name} wrote outside out_dir: {list(work.iterdir())}"
    if path.name == "linear_sra_ablation.ipynb":  # its trainings echo their log into the notebook
        assert_one_line_per_epoch(book, runs=2, epochs=2)


PROGRESS_BAR = re.compile(r"\d+%\||it/s\]|s/it\]|Sanity Checking|Validation DataLoader|^Epoch \d+:")
"""What a progress bar leaves in a log: percentages, rates, Lightning's stage names."""


def printed_text(book) -> str:
    """Everything the notebook's cells printed (stdout and stderr streams)."""
    return "".join(output.get("text", "") for cell in book.cells if cell.cell_type == "code"
                   for output in cell.get("outputs", []) if output.get("output_type") == "stream")


def assert_one_line_per_epoch(book, runs: int, epochs: int) -> None:
    """The trainings' log shows each epoch once (the epoch line), no progress-bar refreshes, no cloud tips, no
    unmeasured FLOPs."""
    lines = printed_text(book).replace("\r", "\n").splitlines()
    spam = [line for line in lines if PROGRESS_BAR.search(line)]
    assert not spam, f"{len(spam)} progress-bar lines, e.g. {spam[:3]}"
    epoch_lines = [line for line in lines if re.match(r"epoch \d+/\d+ \| train loss ", line)]
    assert len(epoch_lines) == runs * epochs, epoch_lines
    assert sum(line.startswith("Run saved to ") for line in lines) == runs
    assert not any("💡" in line or "Total Flops" in line for line in lines)


# --- the helpers behind the ablation notebook (fast) ------------------------------------------------------

def _rows(metric: str, values: dict[str, tuple[float, float]]) -> list[dict]:
    rows = []
    for size, (off, on) in values.items():
        h, w = map(int, size.split("x"))
        for linear, value in ((False, off), (True, on)):
            rows.append(dict(variant="b0", linear_sra=linear, size=size, pixels=h * w, params_m=3.67 - 0.27 * linear,
                             gmacs=1.0, batch_size=4, device="cpu", precision="32", **{metric: value}))
    return rows


def test_crossover_is_the_first_size_from_which_linear_sra_keeps_winning():
    from tools.bench.ablation import crossover, findings

    speed = {"224x224": (10.0, 9.0), "384x224": (6.0, 6.6), "512x512": (2.0, 1.95), "768x768": (1.0, 1.3),
             "1024x1024": (0.5, 0.8)}
    rows = _rows("train_img_s", speed)
    assert crossover(rows, "train_img_s") == "768x768"  # 384x224 wins too, but 512x512 is a tie again
    assert crossover(rows, "train_img_s", margin=0.7) is None  # 1.6x at most
    memory = {"224x224": (100.0, 90.0), "1024x1024": (2000.0, 500.0)}  # lower is better for memory
    assert crossover(_rows("train_mem_mb", memory), "train_mem_mb") == "224x224"
    text = "\n".join(findings(rows))
    assert "from 768x768 upwards" in text and "1.60x at 1024x1024" in text and "0.90x at 224x224" in text


def test_linear_sra_saves_params_everywhere_and_attention_compute_above_224():
    """At 224 both attentions see 7x7 keys/values in every stage; above it only the strided one grows."""
    from tools.bench.ablation import complexity_rows, crossover

    rows = complexity_rows("b0", [(224, 224), (448, 448)])
    by = {(r["size"], r["linear_sra"]): r for r in rows}
    assert by[("224x224", True)]["params_m"] < by[("224x224", False)]["params_m"]
    assert by[("448x448", True)]["gmacs"] < by[("448x448", False)]["gmacs"]
    assert abs(by[("224x224", True)]["gmacs"] - by[("224x224", False)]["gmacs"]) < 0.05
    assert crossover(rows, "gmacs") == "448x448"


def test_the_run_folder_is_read_from_the_summary_the_run_wrote(tmp_path):
    """run_cli's run folder: the newest version folder with a summary.json written since the run started, under the
    --logdir / --name it was given (the log's wording, wrapped or not, does not matter)."""
    import time

    from tools.bench.ablation import run_dir_written

    runs = tmp_path / "runs"
    for version in (0, 1):
        (runs / "b0_32x32" / f"version_{version}").mkdir(parents=True)
    (runs / "b0_32x32" / "version_0" / "summary.json").write_text("{}")
    os.utime(runs / "b0_32x32" / "version_0" / "summary.json", (time.time() - 600, time.time() - 600))  # earlier run
    started = time.time()
    (runs / "b0_32x32" / "version_1" / "summary.json").write_text("{}")
    assert run_dir_written(["--logdir", str(runs), "--name", "b0_32x32"], started) == runs / "b0_32x32" / "version_1"
    assert run_dir_written([f"--logdir={runs}", "--variant", "b0"], started) == runs / "b0_32x32" / "version_1"
    assert run_dir_written(["--logdir", str(runs), "--name", "b2"], started) is None
    assert run_dir_written(["--logdir", str(runs)], started + 3600) is None  # nothing written since
