#!/usr/bin/env python
"""Export a checkpoint or a model variant to ONNX or an ExportedProgram (.pt2), checked against the model.

    python experiments/export.py --checkpoint runs/b2_li_224x224/version_0/checkpoints/best.ckpt \\
        --output b2_li.onnx --dynamic
    python experiments/export.py --variant b0 --num-classes 10 --format exported-program --output b0.pt2

See ``pvt_lightning/cli/export.py`` (and --help) for the options; errors print one line and exit 2.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pvt_lightning.cli.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
