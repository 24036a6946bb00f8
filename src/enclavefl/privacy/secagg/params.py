"""The settings one secure-aggregation round runs with (from the job's privacy.secure_aggregation)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from enclavefl.privacy.secagg.fixedpoint import FixedPoint
from enclavefl.privacy.secagg.graph import resolve_degree, resolve_threshold
from enclavefl.privacy.secagg.messages import KeyAdvert, RoundTag

__all__ = ["MIN_PARTICIPANTS", "SecAggParams", "Signer", "Verifier", "graph_seed"]

MIN_PARTICIPANTS = 3
"""With two workers the sum minus one's own input is the other's input: no privacy to protect."""

Signer = Callable[[bytes], bytes]
"""Signs a payload with the worker's attested (RA-TLS or TLS) private key."""

Verifier = Callable[[str, bytes, bytes], bool]
"""(worker id, payload, signature) -> whether the key bound to that worker at join signed it."""


@dataclass(frozen=True, slots=True)
class SecAggParams:
    """Public parameters every participant of a round agrees on.

    Attributes:
        threshold: a fraction of a worker's share holders (float) or an absolute count
            (int) needed to rebuild its secrets; must come to more than half of them.
        neighbours: k, the share holders per worker; None picks 3 log2 n (complete graph
            when that reaches n - 1).
        quantization_bits, clip_range, rounding: the :class:`FixedPoint` grid.
        weight_cap: the largest integer weight one worker may contribute.
        min_share_ratio: the fraction of advertised workers that must complete the share
            stage, else the attempt fails.
    """

    threshold: float | int = 0.67
    neighbours: int | None = None
    quantization_bits: int = 16
    clip_range: float = 8.0
    rounding: Literal["stochastic", "deterministic"] = "stochastic"
    weight_cap: int = 1024
    min_share_ratio: float = 0.0

    def fixed_point(self) -> FixedPoint:
        """The quantization grid."""
        return FixedPoint(self.clip_range, self.quantization_bits, self.rounding)

    def degree(self, n: int) -> int:
        """k for a round of n workers."""
        return resolve_degree(n, self.neighbours)

    def threshold_count(self, k: int) -> int:
        """t for k share holders (raises ValueError when t would not exceed k/2)."""
        return resolve_threshold(k, self.threshold)


def graph_seed(tag: RoundTag, adverts: Sequence[KeyAdvert]) -> bytes:
    """The neighbour graph's seed: a hash over every advertised key, so no single party chooses it."""
    digest = hashlib.sha256(b"graph|" + tag.encode())
    for advert in sorted(adverts, key=lambda a: a.sender):
        name = advert.sender.encode()
        digest.update(len(name).to_bytes(2, "big") + name + advert.enc_public + advert.mask_public)
    return digest.digest()
