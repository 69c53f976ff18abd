"""The C allocator's settings for running models batch after batch on CPU (no torch import)."""

from __future__ import annotations

import ctypes
import platform

# glibc's mallopt parameters (malloc.h) and the ceiling it accepts for the mmap threshold on 64-bit
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
_TRIM_THRESHOLD = 1024 * 1024 * 1024


def reuse_freed_memory() -> bool:
    """Keep freed tensor memory in the process for the next batch (glibc; a no-op elsewhere).

    glibc returns each freed block above its mmap threshold to the OS, so every forward pass of
    a small model on CPU faults its activations' pages in afresh (thousands of minor page faults
    a batch for `small` at batch 32; `pipelines/bench_model.py` times each model with and
    without this and the channels-last trunk). Raising the mmap threshold to its ceiling
    (32 MB) and the trim threshold to 1 GB serves them from the heap instead; the process then
    keeps its working peak between batches rather than returning it to the OS. Process-wide,
    inherited by forked DataLoader workers; results are unchanged. Returns whether it applied.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mmap = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
    return bool(mmap and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
