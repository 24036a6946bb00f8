"""Mask expansion: a 32-byte seed becomes a vector of uniform uint32 words.

AES-256 in counter mode keyed by the seed, encrypting zeros, is a PRG under the
standard assumption that AES is a pseudorandom permutation (the expanded
length, 4 bytes per word, stays far below the 2**64-block limit). Every seed
is used for one mask only (seeds are fresh per round attempt), so a fixed
all-zero counter block is safe. With AES-NI this runs at several GB/s: a
1M-word mask costs about a millisecond, so masking is not the bottleneck.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = ["expand_mask"]

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
    encryptor.update_into(_zeros(4 * length), memoryview(out).cast("B"))  # CTR: exactly 4 * length bytes
    return out[:length]


_ZEROS = memoryview(bytes(0))


def _zeros(nbytes: int) -> memoryview:
    """A read-only view of ``nbytes`` zero bytes, shared by every call (grown when a longer one is needed)."""
    global _ZEROS
    if len(_ZEROS) < nbytes:
        _ZEROS = memoryview(bytes(nbytes))
    return _ZEROS[:nbytes]
