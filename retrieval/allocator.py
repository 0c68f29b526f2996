"""The C allocator's settings for CPU inference: freed activation buffers stay in the process.

Why: glibc's malloc serves a block above its mmap threshold (128 KiB at start, raised as big
blocks are freed) with a fresh mapping, and gives memory at the top of the heap back to the
kernel once more than the trim threshold is free. A forward pass allocates and frees
megabytes of activations per layer, so each pass can fault those pages in again, zeroed by
the kernel. Measured on an Intel Xeon with AMX (2 threads), MiniLM's int8 Linear at 1,792 x
384 on a freshly allocated input: 2,409 us against 717 us with this module's settings; the
MiniLM cross-encoder on 50 debian-ir dev queries x 10 candidates ran 6.81 -> 6.67 s in fp32
and 4.86 -> 4.39 s in int8 (packed rows; `scratch`, not a shipped bench: `bench/rerank_throughput.py`
runs with these settings, as the service does). The cost is memory kept: up to the trim
threshold (256 MiB) of freed heap stays mapped, plus the top pad.

The settings are process-wide and the process's own: they are applied once, when a CPU model
loads, and never where the user set glibc's `MALLOC_*` variables (theirs win) or where the C
library is not glibc.
"""

import ctypes
import ctypes.util
import functools
import logging
import os
import sys

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = {
    M_MMAP_THRESHOLD: 32 << 20,  # glibc's ceiling on 64-bit: a bigger value is refused
    M_TRIM_THRESHOLD: 256 << 20,
    M_TOP_PAD: 64 << 20,
}


@functools.cache
def keep_freed_memory() -> bool:
    """Apply `SETTINGS` through glibc's `mallopt`, once; whether they are in force."""
    if not sys.platform.startswith("linux") or any(name.startswith("MALLOC_") for name in os.environ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    applied = all(mallopt(param, value) == 1 for param, value in SETTINGS.items())
    if not applied:
        log.warning("glibc refused the allocator settings for CPU inference; running with its defaults")
    return applied
