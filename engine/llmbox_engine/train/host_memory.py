"""glibc malloc for CPU training: serve every block from the heap and keep freed memory mapped for reuse.

torch's CPU allocator caches nothing: each activation, gradient and logits chunk of a step is a fresh `malloc`,
and glibc serves every block above its mmap threshold (128 KB, rising to at most 32 MB) with a new `mmap` that
the kernel faults in and zeroes page by page, then unmaps on `free`. A training step allocates and frees
gigabytes this way: converting a 50 MB chunk of logits to fp32 took 11 ms into fresh pages against 2.6 ms into
pages already mapped. With mmap off and no trimming, a freed block goes back to the heap and the next pass
reuses it: +9% tokens/s in the CPU training benchmark (benchmarks/README.md), the same peak RSS (the heap grows
to the step's peak once and stays there, which is where a long run's memory sits anyway).
"""

from __future__ import annotations

import ctypes
import sys

# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # an int: the largest top-of-heap slack glibc will keep before giving pages back


def _glibc() -> ctypes.CDLL | None:
    """The C library this process runs on, when it is glibc (not macOS, not musl, whose malloc differs)."""
    if not sys.platform.startswith("linux"):
        return None
    process = ctypes.CDLL(None)
    return process if hasattr(process, "gnu_get_libc_version") else None


def keep_freed_memory() -> bool:
    """Tune this process's glibc malloc as above; False where there is no glibc (macOS, musl) and nothing changed."""
    process = _glibc()
    if process is None:
        return False
    mallopt = process.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, _NEVER_TRIM))


def release_freed_memory() -> bool:
    """Give the heap's free pages back to the system once, after loading: a quantized load reads each weight in
    the checkpoint's precision before packing it, and under `keep_freed_memory` those pages would stay resident
    for the whole run. False where there is no glibc."""
    process = _glibc()
    if process is None:
        return False
    process.malloc_trim(0)
    return True
