"""Keep freed memory in the process (glibc): CPU training steps stop page-faulting their activations back in.

Every training step frees and re-allocates the same large activation buffers. With glibc's default
malloc settings the large ones are mmap-ed per allocation or trimmed back to the kernel when freed,
so each step pays zero-filled page faults for them again. Turning that off is what PyTorch's CPU
performance guide does with jemalloc/tcmalloc; ``mallopt`` gets the same effect without a preload
(measured effect: docs/performance.md). The cost: the process keeps its peak heap instead of returning
it to the OS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

OPT_OUT_ENV = "PVT_LIGHTNING_KEEP_FREED_MEMORY"
"""Set to 0 to keep glibc's default malloc behaviour."""

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2**31 - 1  # bytes of free memory at the heap top before it is given back: never, in practice


def keep_freed_memory() -> bool:
    """Make glibc malloc serve every allocation from its heap and never trim it; True if it took effect.

    A no-op (False) on other C libraries (macOS, Windows, musl) and when ``PVT_LIGHTNING_KEEP_FREED_MEMORY=0``.
    Process-wide, inherited by forked DataLoader workers.
    """
    if os.environ.get(OPT_OUT_ENV, "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only: other libcs' mallopt (if any) take other parameter numbers
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
