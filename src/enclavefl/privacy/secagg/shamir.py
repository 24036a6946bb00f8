"""Shamir t-of-n secret sharing of 32-byte secrets over a 257-bit prime field.

A secret s is the constant term of a random polynomial f of degree t-1 over
GF(p); the share of the participant at x (x >= 1) is (x, f(x)). Any t shares
determine f by Lagrange interpolation and give s = f(0); t-1 shares are
uniformly distributed whatever s is, so they reveal nothing (Shamir 1979,
"How to share a secret"). Secure aggregation shares each worker's self-mask
seed and its mask private key this way (Bonawitz et al. 2017, section 4).

p = 2**256 + 297 is the smallest prime above 2**256, so every 32-byte string
is a field element and round-trips exactly.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from enclavefl.errors import ProtocolError

__all__ = ["PRIME", "SECRET_BYTES", "SHARE_VALUE_BYTES", "Share", "combine_shares", "split_secret"]

PRIME = 2**256 + 297
SECRET_BYTES = 32
SHARE_VALUE_BYTES = 33
"""A share's value f(x) < PRIME needs 257 bits: 33 bytes, big-endian."""


@dataclass(frozen=True, slots=True)
class Share:
    """One point (x, f(x)) of a sharing polynomial; x is the holder's 1-based position."""

    x: int
    y: int

    def value_bytes(self) -> bytes:
        """f(x) as 33 big-endian bytes (x travels separately)."""
        return self.y.to_bytes(SHARE_VALUE_BYTES, "big")

    @classmethod
    def from_value_bytes(cls, x: int, data: bytes) -> Share:
        """Reads a share value written by :meth:`value_bytes`.

        Raises:
            ProtocolError: ``data`` is not 33 bytes or is not a field element.
        """
        if len(data) != SHARE_VALUE_BYTES:
            raise ProtocolError(f"a share value is {SHARE_VALUE_BYTES} bytes, got {len(data)}")
        y = int.from_bytes(data, "big")
        if y >= PRIME or x < 1:
            raise ProtocolError(f"share (x={x}) is outside the field")
        return cls(x, y)


def split_secret(secret: bytes, threshold: int, xs: Sequence[int]) -> list[Share]:
    """Splits a 32-byte secret into one share per x; any ``threshold`` of them recover it.

    Args:
        secret: exactly 32 bytes (a PRG seed or an X25519 private key).
        threshold: t, the number of shares needed; 1 <= t <= len(xs).
        xs: distinct positive evaluation points, one per holder.

    Raises:
        ValueError: a bad secret length, threshold or evaluation point (caller misuse).
    """
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a secret is {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be between 1 and the {len(xs)} holders")
    if len(set(xs)) != len(xs) or any(x < 1 or x >= PRIME for x in xs):
        raise ValueError("evaluation points must be distinct and in [1, p)")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in xs:
        y = 0
        for c in reversed(coefficients):  # Horner: f(x) = c0 + x (c1 + x (c2 + ...))
            y = (y * x + c) % PRIME
        shares.append(Share(x, y))
    return shares


def combine_shares(shares: Sequence[Share], threshold: int) -> bytes:
    """Recovers the secret from at least ``threshold`` shares (the first t are used).

    Raises:
        ProtocolError: fewer than ``threshold`` shares, repeated x, or the result is
            not a 32-byte value (some share was not of this secret).
    """
    if len(shares) < threshold:
        raise ProtocolError(f"{threshold} shares are needed to recover a secret, got {len(shares)}")
    points = list(shares[:threshold])
    xs = [s.x for s in points]
    if len(set(xs)) != len(xs):
        raise ProtocolError(f"shares repeat an evaluation point: {sorted(xs)}")
    secret = 0
    for i, share in enumerate(points):
        # Lagrange basis at 0: prod_{j != i} x_j / (x_j - x_i).
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - share.x) % PRIME
        secret = (secret + share.y * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise ProtocolError("the shares do not interpolate to a 32-byte secret (a share is corrupt)")
    return secret.to_bytes(SECRET_BYTES, "big")
