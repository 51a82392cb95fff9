#!/usr/bin/env python
"""Print pip requirements pinning every runtime dependency of setup.cfg to its declared lower bound.

`torch>=2.13` becomes `torch==2.13`, an exact pin stays; exclusions (`!=`) are dropped, since the floor
itself must be a release the code runs on. CI installs these in a fresh virtual environment and runs
the fast tests there, so the floors in setup.cfg are versions the code really runs on.
"""

import configparser
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lower_bounds() -> list[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    pins = []
    for line in cfg["options"]["install_requires"].split("\n"):
        line = line.strip()
        if not line:
            continue
        name = re.split(r"[<>=!~ ]", line, maxsplit=1)[0]
        floor = re.search(r"(?:>=|==)\s*([\w.]+)", line)
        if floor is None:
            raise SystemExit(f"setup.cfg: {line!r} declares no lower bound")
        pins.append(f"{name}=={floor.group(1)}")
    return pins


if __name__ == "__main__":
    print("\n".join(lower_bounds()))
