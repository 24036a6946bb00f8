"""glibc allocator settings for long-running PS and worker processes.

gRPC serves each call on its own thread, and glibc gives busy threads their
own malloc arenas; chunk-sized buffers freed in one arena and allocated in
another keep the process's resident memory growing with the number of
concurrent streams. Two arenas and a fixed mmap threshold (large tensors are
mmapped and returned to the OS when freed) keep PS memory flat as workers are
added, and measured no slower in ``bench/round_overhead.py``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

__all__ = ["tune_malloc"]

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tune_malloc(arenas: int = 2, mmap_threshold_bytes: int = 8 * 2**20) -> bool:
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
    ok = bool(mallopt(_M_ARENA_MAX, arenas)) and bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold_bytes))
    log.debug("malloc tuning: arenas=%d mmap_threshold=%d applied=%s", arenas, mmap_threshold_bytes, ok)
    return ok
