"""The package installs as declared: setup.cfg and environment.yml agree; the console script exists."""

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _requirements(lines):
    reqs = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith(("#", "-e")):
            continue
        name = re.split(r"[<>=!~\[ ;]", line, maxsplit=1)[0].lower().replace("_", "-")
        reqs[name] = line.replace(" ", "")
    return reqs


def setup_cfg_requirements():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines() + cfg["options.extras_require"]["dev"].splitlines()
    return _requirements(lines)


def environment_yml_requirements():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return _requirements(pip_section)


def test_environment_yml_names_the_same_packages_as_setup_cfg():
    assert environment_yml_requirements() == setup_cfg_requirements()


def test_dependency_policy():
    reqs = setup_cfg_requirements()
    assert reqs["albumentations"] == "albumentations==2.0.8"  # last MIT release
    assert "!=2.6.2" in reqs["lightning"] and "!=2.6.3" in reqs["lightning"]  # withdrawn releases
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    runtime = _requirements(cfg["options"]["install_requires"].splitlines())
    assert "timm" not in runtime  # a test / benchmark reference only


@pytest.mark.slow
def test_console_script_and_run_py_help():
    script = shutil.which("pvt-lightning")
    assert script, "pvt-lightning console script not installed (pip install -e .)"
    out = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--variant" in out.stdout
    out = subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "--img-size" in out.stdout


def test_lower_bounds_pin_every_runtime_dependency():
    """CI installs these pins in a fresh environment and runs the fast tests there (.ci/run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lower_bounds", ROOT / ".ci" / "lower_bounds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pins = _requirements(module.lower_bounds())
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    runtime = _requirements(cfg["options"]["install_requires"].splitlines())
    assert pins.keys() == runtime.keys()
    for name, pin in pins.items():
        floor = re.search(r"(?:>=|==)([\w.]+)", runtime[name]).group(1)
        assert pin == f"{name}=={floor}"
    assert pins["lightning"] == "lightning==2.6.0"  # EMAWeightAveraging arrived in Lightning 2.6.0
