"""Process memory allocator tuning: keep freed memory for reuse instead of returning it to the kernel.

glibc's malloc serves every block above its mmap threshold (32 MiB at most)
with a fresh ``mmap`` and returns it with ``munmap`` on free, so a training
step that allocates the same large activations every time pays for page
faults on every page of them, every step. Under a sandboxed kernel (gVisor,
as on our benchmark machines) a page fault costs several microseconds: the
dpdm cpu U-Net's non-private step on a batch of 2,048 took 11.8 s on one
thread, 5.8 s with freed memory kept (benchmarks/results/dpsgd_overhead.json).

`keep_freed_memory` raises the mmap threshold to 1 GiB and the trim threshold
to 2 GiB with ``mallopt``: the process's resident memory then stays at its
high-water mark (the memory is reused, not leaked). It does nothing where
the C library is not glibc, and nothing when ``DPIMAGES_KEEP_FREED_MEMORY=0``.
No privacy relevance.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 30
TRIM_THRESHOLD_BYTES = 2**31 - 1

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Tune glibc's malloc once per process (see the module docstring); True if it is in effect."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("DPIMAGES_KEEP_FREED_MEMORY", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _done = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        _done = False
    return _done
