"""Fixed-point encoding of updates into Z_{2^32}, where masks cancel exactly.

How this works: a value x is clipped to [-c, c] (c = ``clip_range``) and
mapped to the integer q = round(x / step), step = c / L, L = 2**(bits-1) - 1,
so |q| <= L. A worker multiplies q by its integer (capped) weight w and the
result is stored modulo 2**32 (two's complement). Masks are uniform words
added modulo 2**32, so they cancel exactly in the sum; the unmasked sum, read
back as a signed 32-bit integer, is exact as long as the true sum
sum_i w_i q_i stays inside [-2**31, 2**31): ``capacity`` is the largest total
weight that guarantees it. A last word carries w itself, so the PS learns
only the total weight and the weighted sum, never one worker's weight.

Error bound, per coordinate of the weighted mean sum_i w_i q_i step / sum_i w_i
against the mean of the clipped inputs: at most step/2 with deterministic
(nearest) rounding; strictly below step with stochastic rounding, which is
unbiased (E[q step] = x, to 2**-32 of a step), so its error averages out over workers and rounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from enclavefl.errors import ProtocolError
from enclavefl.privacy.secagg.prg import Keystream

__all__ = ["ENCODE_BLOCK", "FixedPoint"]

ENCODE_BLOCK = 64 * 1024
"""Values :meth:`FixedPoint.encode` converts at a time (512 KiB of float64 scratch)."""

_WORD = 2**32
_HALF_WORD = 2**31


@dataclass(frozen=True, slots=True)
class FixedPoint:
    """The quantization grid every worker of a round shares.

    Attributes:
        clip_range: c; inputs are clipped to [-c, c] first.
        bits: quantization bits (sign included), 2..31.
        rounding: ``stochastic`` (unbiased) or ``deterministic`` (nearest).
    """

    clip_range: float
    bits: int
    rounding: Literal["stochastic", "deterministic"] = "stochastic"

    def __post_init__(self) -> None:
        if not self.clip_range > 0:
            raise ValueError(f"clip_range must be > 0, got {self.clip_range}")
        if not 2 <= self.bits <= 31:
            raise ValueError(f"quantization bits must be in 2..31, got {self.bits}")

    @property
    def levels(self) -> int:
        """L, the largest |q|."""
        return int(2 ** (self.bits - 1)) - 1

    @property
    def step(self) -> float:
        """The value of one quantization unit: c / L."""
        return self.clip_range / self.levels

    @property
    def capacity(self) -> int:
        """The largest total weight whose weighted sum cannot overflow a signed 32-bit word."""
        return (_HALF_WORD - 1) // self.levels

    def max_error(self) -> float:
        """The bound on one coordinate's error of the weighted mean (see the module docstring)."""
        return self.step / 2 if self.rounding == "deterministic" else self.step

    def encode(self, values: np.ndarray, weight: int, rng: np.random.Generator) -> np.ndarray:
        """w * round(clip(values) / step) modulo 2**32, with w appended as a last word.

        Args:
            values: any float array; flattened (shape (n,) -> result shape (n + 1,), uint32).
            weight: the worker's capped integer weight, 1 <= weight <= capacity.
            rng: keys the stochastic rounding's coin flips (32 bytes are drawn from it).

        Raises:
            ValueError: a weight out of range or a non-finite value (caller misuse: clip first).
        """
        if not 1 <= weight <= self.capacity:
            raise ValueError(f"weight must be in 1..{self.capacity}, got {weight}")
        given = np.asarray(values).reshape(-1)
        n = given.shape[0]
        out = np.empty(n + 1, dtype=np.uint32)
        q = out[:-1].view(np.int32)
        # Block by block, so the float64 scratch stays in cache instead of three model-sized temporaries.
        scaled = np.empty(min(n, ENCODE_BLOCK), dtype=np.float64)
        coins = np.empty_like(scaled)
        # The coin flips: 32-bit words of an AES-CTR keystream keyed from ``rng`` (a tenth of the
        # cost of drawing floats from it); k / 2**32 is exact in float64.
        flips_of = Keystream(rng.bytes(32), ENCODE_BLOCK) if self.rounding == "stochastic" else None
        inverse_step = 1.0 / self.step
        for start in range(0, n, ENCODE_BLOCK):
            stop = min(start + ENCODE_BLOCK, n)
            part, block = given[start:stop], scaled[:stop - start]
            if not np.isfinite(part).all():
                raise ValueError("cannot encode a non-finite value")
            np.clip(part, -self.clip_range, self.clip_range, out=block)
            block *= inverse_step  # in [-L, L]
            if flips_of is not None:
                flips = coins[:stop - start]
                np.multiply(flips_of.next(stop - start), 2.0**-32, out=flips)  # U on a 2**-32 grid in [0, 1)
                block += flips  # floor(x + U) rounds up with P = frac(x) (to 2**-32): unbiased
                np.floor(block, out=block)
            else:
                np.rint(block, out=block)
            words = q[start:stop]
            words[...] = block  # |q| <= L < 2**31: exact
            # int32 products wrap modulo 2**32, which is the arithmetic we want (two's complement residues).
            with np.errstate(over="ignore"):
                words *= np.int32(weight)
        out[-1] = weight
        return out

    def decode_sum(self, total: np.ndarray) -> tuple[np.ndarray, int]:
        """The weighted sum (float64, in input units) and the total weight from an unmasked sum.

        Raises:
            ProtocolError: the total weight is zero or beyond ``capacity`` (the sum may have wrapped).
        """
        weight = int(total[-1])
        if not 1 <= weight <= self.capacity:
            raise ProtocolError(f"unmasked total weight {weight} is outside 1..{self.capacity}: the sum may have wrapped")
        signed = total[:-1].view(np.int32).astype(np.float64)
        return signed * self.step, weight

    def decode_mean(self, total: np.ndarray) -> np.ndarray:
        """The weighted mean of the (clipped) inputs from an unmasked sum."""
        weighted, weight = self.decode_sum(total)
        return weighted / weight

