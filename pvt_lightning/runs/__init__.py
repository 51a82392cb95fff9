"""Run folders: atomic writes, version folders, checkpoints, summary.json, and reading runs back to compare them."""
