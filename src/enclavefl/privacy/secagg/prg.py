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
    zeros = bytearray(4 * length)
    out = bytearray(4 * length + 15)  # update_into wants block_size - 1 spare bytes
    encryptor.update_into(zeros, out)  # CTR is a stream cipher: exactly 4 * length bytes
    return np.frombuffer(out, dtype="<u4", count=length)
