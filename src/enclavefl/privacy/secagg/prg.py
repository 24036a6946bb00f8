"""Mask expansion: a 32-byte seed becomes a vector of uniform uint32 words.

AES-256 in counter mode keyed by the seed, encrypting zeros, is a PRG under the
standard assumption that AES is a pseudorandom permutation (the expanded
length, 4 bytes per word, stays far below the 2**64-block limit). Every seed
is used for one mask only (seeds are fresh per round attempt), so a fixed
all-zero counter block is safe. With AES-NI this runs at about 8 GB/s: a
1M-word mask costs about half a millisecond, yet with a self-mask and k pairwise
masks it is still the largest part of a worker's secure-aggregation work.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import final

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = ["BLOCK_WORDS", "Keystream", "add_masks", "expand_mask"]

BLOCK_WORDS = 32 * 1024
"""Words :func:`add_masks` expands at a time (128 KiB: the vector's block stays in cache across masks)."""

_ZERO_COUNTER = bytes(16)


def expand_mask(seed: bytes, length: int) -> np.ndarray:
    """The ``length`` pseudorandom uint32 words of ``seed`` (little-endian AES-CTR keystream).

    Raises:
        ValueError: the seed is not 32 bytes or ``length`` is negative (caller misuse).
    """
    if len(seed) != 32:
        raise ValueError(f"a mask seed is 32 bytes, got {len(seed)}")
    if length < 0:
        raise ValueError(f"mask length must be >= 0, got {length}")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_COUNTER)).encryptor()
    out = np.empty(length + 4, dtype="<u4")  # update_into wants block_size - 1 spare bytes; not zero-filled
    encryptor.update_into(_zeros(4 * length), out.data.cast("B"))  # CTR: exactly 4 * length bytes
    return out[:length]


def add_masks(vector: np.ndarray, masks: Sequence[tuple[bytes, int]]) -> None:
    """vector += sum(sign * expand_mask(seed, len(vector))) modulo 2**32, in place, block by block.

    The same keystreams as :func:`expand_mask`, but each block of ``vector`` is
    visited once for all masks, so the memory traffic is one pass over the
    vector instead of three per mask, and no mask-sized buffer is allocated.

    Args:
        vector: uint32, shape (n,).
        masks: (32-byte seed, +1 or -1) pairs.

    Raises:
        ValueError: a seed of another length, a sign other than +-1, or a vector that is not uint32.
    """
    if vector.dtype != np.uint32 or vector.ndim != 1:
        raise ValueError(f"masks are added to a 1-d uint32 vector, got {vector.dtype} {vector.shape}")
    streams = []
    for seed, sign in masks:
        if len(seed) != 32 or sign not in (1, -1):
            raise ValueError("a mask is a 32-byte seed and a sign of +1 or -1")
        streams.append((Cipher(algorithms.AES(seed), modes.CTR(_ZERO_COUNTER)).encryptor(), sign))
    buffer = np.empty(BLOCK_WORDS + 4, dtype="<u4")
    raw = buffer.data.cast("B")
    n = vector.shape[0]
    for start in range(0, n, BLOCK_WORDS):
        stop = min(start + BLOCK_WORDS, n)
        block, words = vector[start:stop], stop - start
        zeros = _zeros(4 * words)
        for encryptor, sign in streams:
            encryptor.update_into(zeros, raw)
            if sign > 0:
                block += buffer[:words]
            else:
                block -= buffer[:words]


@final
class Keystream:
    """One seed's AES-CTR keystream as uint32 words, a block at a time, in one reused buffer.

    The same words as :func:`expand_mask`, for callers that consume them block by
    block (the fixed-point encoder's coin flips) without a model-sized array.
    """

    def __init__(self, seed: bytes, block_words: int = BLOCK_WORDS) -> None:
        """Raises: ValueError: the seed is not 32 bytes or ``block_words`` < 1 (caller misuse)."""
        if len(seed) != 32:
            raise ValueError(f"a keystream seed is 32 bytes, got {len(seed)}")
        if block_words < 1:
            raise ValueError(f"block_words must be >= 1, got {block_words}")
        self._encryptor = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_COUNTER)).encryptor()
        self._buffer = np.empty(block_words + 4, dtype="<u4")  # update_into's spare block
        self._raw = self._buffer.data.cast("B")
        self._block_words = block_words

    def next(self, words: int) -> np.ndarray:
        """The next ``words`` words: a view that the following call overwrites.

        Raises:
            ValueError: more words than the block or a negative count (caller misuse).
        """
        if not 0 <= words <= self._block_words:
            raise ValueError(f"a keystream block holds 0..{self._block_words} words, asked {words}")
        self._encryptor.update_into(_zeros(4 * words), self._raw)
        return self._buffer[:words]


_ZEROS = memoryview(bytes(0))


def _zeros(nbytes: int) -> memoryview:
    """A read-only view of ``nbytes`` zero bytes, shared by every call (grown when a longer one is needed)."""
    global _ZEROS
    if len(_ZEROS) < nbytes:
        _ZEROS = memoryview(bytes(nbytes))
    return _ZEROS[:nbytes]
