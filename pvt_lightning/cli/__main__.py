"""``python -m pvt_lightning.cli``: the same as the ``pvt-lightning`` command."""

import sys

from pvt_lightning.cli.main import main

sys.exit(main())
