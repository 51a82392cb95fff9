"""keep_freed_memory: a freed large buffer is reused without page faults (glibc), and the opt-out works."""

import os
import subprocess
import sys

import pytest

# Allocate, touch and free a 64 MB tensor, as a training step does; print the page faults of a steady-state round.
PROBE = """
import resource, sys, torch
from pvt_lightning.training.allocator import keep_freed_memory
print(keep_freed_memory())
def round_trip():
    x = torch.ones(16 * 2**20)  # 64 MB, zero-filled pages touched by the fill
    del x
for _ in range(3):  # the heap reaches its steady state within two rounds
    round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_trip()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(opt_out: bool) -> tuple[str, int]:
    env = dict(os.environ, PVT_LIGHTNING_KEEP_FREED_MEMORY="0" if opt_out else "1")
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    applied, faults = proc.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
@pytest.mark.slow
def test_freed_buffers_are_reused_without_page_faults():
    applied, faults = probe(opt_out=False)
    assert applied == "True"
    assert faults < 1000  # the 16384 pages of the buffer come back from the heap, not from the kernel
    applied, faults = probe(opt_out=True)
    assert applied == "False"
    assert faults > 10000  # glibc's default: the buffer was returned to the kernel and faults back in
