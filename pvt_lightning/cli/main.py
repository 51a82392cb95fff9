"""Command line of ``experiments/run.py`` / ``pvt-lightning``: parse the configuration, run one job, map errors to exit codes.

Exit statuses: 0 done; 2 a usage or data error (one message, no traceback); 3 training stopped on a
NaN/inf loss or out of memory; 143 stopped by SIGTERM after saving; 1 a bug (with its traceback).
"""

from __future__ import annotations

import sys
from typing import Sequence

from pvt_lightning.training.allocator import keep_freed_memory
from pvt_lightning.cli.config import parse_config
from pvt_lightning.errors import UsageError


def main(argv: Sequence[str] | None = None) -> int:
    from pvt_lightning.errors import DataError
    from pvt_lightning.errors import CheckpointError
    from pvt_lightning.errors import RunStopped

    try:
        config = parse_config(argv)
        if config is None:  # --print-config
            return 0
        keep_freed_memory()  # CPU steps stop page-faulting their activations back in (see allocator.py)
        if config.evaluate:
            from pvt_lightning.cli.infer import evaluate

            return evaluate(config)
        if config.predict:
            from pvt_lightning.cli.infer import predict

            return predict(config)
        from pvt_lightning.cli.train import train

        return train(config)
    except (UsageError, DataError, CheckpointError) as err:
        print(f"pvt-lightning: error: {err}", file=sys.stderr)
        return 2
    except RunStopped as err:
        print(f"pvt-lightning: stopped: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
