"""Large CPU tensors without page faults: glibc's malloc asked to keep the memory it frees.

By default glibc serves an allocation above its mmap threshold (128 KiB at first, raised as blocks are freed, at
most 32 MiB) with a fresh mapping and unmaps it on free, and it returns the top of its heap to the system once
more than the trim threshold is free. A forward allocates and frees its activations every layer, so every large
tensor came from new pages, and the first touch of each page is a page fault: a bfloat16 prefill of 4,096 tokens
(Qwen2.5-0.5B shapes, 2 threads) took 1.1 million faults and 8.1-8.4 s, against none and 6.6-6.8 s with the
settings below (a prefill of 512 tokens: 89,000 faults, 0.66 s against 0.52 s).

retain_freed_memory() makes every allocation come from the heap (no mmap) and gives the heap's top back only
past 2 GiB free: freed memory is reused by the next allocation. The process keeps its peak heap size (up to that)
until it exits, as with jemalloc or tcmalloc; the numbers computed are unchanged. It acts on the whole process,
once; load() calls it.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import threading

log = logging.getLogger("qwen_ref")

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # bytes free at the top of the heap before glibc gives them back (mallopt's int limit)
_lock = threading.Lock()
_done: bool | None = None


def retain_freed_memory() -> bool:
    """True once glibc keeps freed memory for reuse (a no-op after the first call); False where the C library is
    not glibc or refused (then allocation is as it was: slower, never wrong)."""
    global _done
    with _lock:
        if _done is None:
            _done = _apply()
        return _done


def _apply() -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1  # 1: accepted
    if not ok:
        log.info("qwen_ref: glibc's mallopt refused the allocator settings; large tensors keep faulting pages in")
    return ok
