"""glibc allocator settings for long-running PS and worker processes.

gRPC serves each call on its own thread, and glibc gives busy threads their
own malloc arenas; chunk-sized buffers freed in one arena and allocated in
another keep the process's resident memory growing with the number of
concurrent streams. Two arenas and a fixed mmap threshold (large tensors are
mmapped and returned to the OS when freed) keep PS memory flat as workers are
added, and measured no slower in ``bench/round_overhead.py``.

A fixed mmap threshold also fixes glibc's trim threshold at its 128 KiB
default: each freed 2 MiB message buffer at the top of a heap was handed back
to the OS and the next one faulted in afresh, page by page. A 32 MiB trim
threshold keeps that much free memory per heap for reuse; it took a 10-worker
round from 53k to 8k page faults in the PS (245k to 41k in the workers) and
cut the round's CPU time by a fifth, for about 20 MB more PS peak memory
(docs/performance.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

__all__ = ["tune_malloc"]

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tune_malloc(arenas: int = 2, mmap_threshold_bytes: int = 8 * 2**20, trim_threshold_bytes: int = 32 * 2**20) -> bool:
    """Applies the settings on glibc; returns False (and changes nothing) elsewhere.

    Call it before the process starts threads: arenas already created stay.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = (bool(mallopt(_M_ARENA_MAX, arenas)) and bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold_bytes))
          and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold_bytes)))
    log.debug("malloc tuning: arenas=%d mmap_threshold=%d trim_threshold=%d applied=%s", arenas,
              mmap_threshold_bytes, trim_threshold_bytes, ok)
    return ok
