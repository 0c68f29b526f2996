"""The C allocator's settings for CPU inference: freed activation buffers stay in the process.

Why: glibc's malloc serves a block above its mmap threshold (128 KiB at start, raised as big
blocks are freed) with a fresh mapping, and gives memory at the top of the heap back to the
kernel once more than the trim threshold is free. A forward pass allocates and frees
megabytes of activations per layer, so each pass can fault those pages in again, zeroed by
the kernel. Measured with `bench/rerank_throughput.py --variants fp32,bf16,int8` (MiniLM-L6
cross-encoder, packed pairs, 100 debian-ir dev queries x hybrid top 10, Intel Xeon with AMX,
2 threads, cadd4f4) against glibc's defaults: fp32 66.01 -> 71.93 pairs/s, bf16 141.77 -> 158.27,
int8 92.02 -> 108.97 (int8 allocates most: its quantized inputs and dequantized outputs). The
cost is memory kept: up to the trim threshold (256 MiB) of freed heap stays mapped, plus the top
pad (64 MiB).

The settings are process-wide and the process's own: they are applied once, when a CPU model
loads, and never where the user set any of glibc's `MALLOC_*` variables (theirs win; the bench's
A/B runs with `MALLOC_PERTURB_=0`, which changes nothing else) or where the C library is not glibc.
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
