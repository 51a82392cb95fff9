#!/usr/bin/env python
"""Train (the default), evaluate or predict: ``python experiments/run.py --variant b2_li`` (see --help).

The same as ``pvt-lightning train ...``; ``--evaluate CKPT`` and ``--predict DIR --checkpoint CKPT`` run the
``evaluate`` and ``predict`` subcommands, and ``run.py SUBCOMMAND ...`` any other one.
"""

import sys

from pvt_lightning.cli.main import main

if __name__ == "__main__":
    sys.exit(main(default="train"))
