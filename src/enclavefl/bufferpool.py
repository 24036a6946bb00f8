"""Payload buffers that a :class:`~enclavefl.tensors.StreamDecoder` reuses once nothing views them.

How this works: a decoder writes a whole stream into one uint8 buffer and hands
out numpy views of it, so a buffer is free again only when every view of the
decoded tensors is gone, which the decoder cannot know. The pool keeps a
reference to each buffer it lends (at most ``max_buffers``) and, when asked for
another, lends again a buffer whose reference count shows that the pool alone
holds it: a view, a memoryview, or a decoder still writing into it all hold a
reference, so a buffer in use is never lent twice.

Why: a model-sized buffer freshly allocated per upload is fresh memory the
kernel must fault in and zero page by page; a PS taking ten 45 MB uploads a
round spent a quarter of its CPU time there (docs/performance.md). A reused
buffer is already resident. The pool retains at most ``max_buffers`` buffers,
which bounds the memory it keeps when idle; the most any stream needs at once
is unchanged.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Final, TypeAlias, final

import numpy as np
import numpy.typing as npt

__all__ = ["BufferPool"]

Array: TypeAlias = npt.NDArray[Any]

# sys.getrefcount(buffer) for a buffer the pool alone holds, read in take()'s
# loop: the pool's list, the loop variable and getrefcount's own argument.
_FREE_REFCOUNT: Final = 3


@final
class BufferPool:
    """Lends uint8 buffers and lends them again once nothing else refers to them. Thread-safe."""

    __slots__ = ("_max_buffers", "_max_buffer_bytes", "_lent", "_lock", "reused", "allocated")

    def __init__(self, max_buffers: int, *, max_buffer_bytes: int | None = None) -> None:
        """Args:
            max_buffers: buffers the pool keeps track of (and so keeps in memory once
                they are free); 0 makes a pool that never reuses anything.
            max_buffer_bytes: a larger buffer is lent but never kept, so that an idle
                pool does not hold gigabytes; None: no limit.

        Raises:
            ValueError: ``max_buffers`` or ``max_buffer_bytes`` is not an int >= 0.
        """
        for what, value in (("max_buffers", max_buffers), ("max_buffer_bytes", max_buffer_bytes)):
            if value is None and what == "max_buffer_bytes":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"BufferPool: {what} must be an int >= 0, got {value!r}")
        self._max_buffers = max_buffers
        self._max_buffer_bytes = max_buffer_bytes
        self._lent: list[Array] = []
        self._lock = threading.Lock()
        self.reused = 0
        """Buffers lent again (a count, for tests and benchmarks)."""
        self.allocated = 0
        """Buffers allocated."""

    def take(self, nbytes: int) -> Array:
        """A 1-D uint8 array of exactly ``nbytes`` bytes, uninitialised (a view of a pooled buffer).

        A free pooled buffer of at least ``nbytes`` is reused. Otherwise a new one
        is allocated, and kept in place of a free one that is too small or, when
        the pool is full, of one still in use (the pool forgets it, so it is freed
        when its user lets go: the pool never keeps a second copy alive). The
        caller checks ``nbytes`` against its limits first.
        """
        with self._lock:
            fits, drop = self._scan(nbytes)
            if fits is not None:
                self.reused += 1
                return fits[:nbytes]
            if drop is not None:
                self._lent = [b for b in self._lent if b is not drop]
            del drop
            fresh: Array = np.empty(nbytes, dtype=np.uint8)
            self.allocated += 1
            small = self._max_buffer_bytes is None or nbytes <= self._max_buffer_bytes
            if len(self._lent) < self._max_buffers and small:
                self._lent.append(fresh)
            return fresh[:nbytes]

    def _scan(self, nbytes: int) -> tuple[Array | None, Array | None]:
        """The smallest free buffer of at least ``nbytes``, else one to stop tracking (or None).

        The one to stop tracking is a free buffer too small, else (in a full pool)
        the first buffer still in use.
        """
        fits: Array | None = None
        too_small: Array | None = None
        busy: Array | None = None
        for buffer in self._lent:
            if sys.getrefcount(buffer) != _FREE_REFCOUNT:
                if busy is None:
                    busy = buffer
            elif buffer.nbytes >= nbytes:
                if fits is None or buffer.nbytes < fits.nbytes:
                    fits = buffer
            elif too_small is None:
                too_small = buffer
        if fits is not None:
            return fits, None
        if too_small is not None:
            return None, too_small
        return None, busy if len(self._lent) >= self._max_buffers else None

    def clear(self) -> None:
        """Forgets every buffer (those still in use stay valid for their users)."""
        with self._lock:
            self._lent = []
