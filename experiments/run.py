#!/usr/bin/env python
"""Train, evaluate or predict: `python experiments/run.py --variant b2_li` (see --help)."""

import sys

from pvt_lightning.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
