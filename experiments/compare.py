#!/usr/bin/env python
"""Compare runs: ``python experiments/compare.py --logdir runs [--filter b2] [--out compare_out] [--per-class]``.

The same as ``pvt-lightning compare`` (see --help and pvt_lightning/cli/compare.py).
"""

import sys

from pvt_lightning.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
