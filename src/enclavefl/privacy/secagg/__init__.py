"""Secure aggregation (SecAgg, Bonawitz et al. 2017; SecAgg+, Bell et al. 2020) without transport.

The PS learns only the weighted sum of the surviving workers' quantized updates
and their total weight: each worker's upload is masked by pseudorandom vectors
that cancel in the sum, and the masks of workers that drop out are removed
from Shamir shares held by their neighbours. :class:`SecAggClient` and
:class:`SecAggServer` are plain state machines exchanging the dataclasses of
:mod:`enclavefl.privacy.secagg.messages`; the wire and the round engine drive them.

Names are loaded on first use (PEP 562): the seam types in
:mod:`~enclavefl.privacy.secagg.stages` and :mod:`~enclavefl.privacy.secagg.messages`
import without ``cryptography``, so the PS's parts and the worker runtime that
refer to them still load without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from enclavefl.privacy.secagg.client import SecAggClient
    from enclavefl.privacy.secagg.fixedpoint import FixedPoint
    from enclavefl.privacy.secagg.graph import (
        auto_degree,
        neighbour_graph,
        neighbours_of,
        resolve_degree,
        resolve_threshold,
    )
    from enclavefl.privacy.secagg.keys import KeyPair, agree, open_sealed, seal
    from enclavefl.privacy.secagg.messages import (
        KeyAdvert,
        MaskedInput,
        Roster,
        RoundTag,
        ShareCiphertext,
        UnmaskReply,
        UnmaskRequest,
    )
    from enclavefl.privacy.secagg.params import MIN_PARTICIPANTS, SecAggParams, Signer, Verifier, graph_seed
    from enclavefl.privacy.secagg.prg import expand_mask
    from enclavefl.privacy.secagg.server import SecAggResult, SecAggServer
    from enclavefl.privacy.secagg.shamir import PRIME, Share, combine_shares, split_secret

_HOMES = {
    "SecAggClient": "client",
    "FixedPoint": "fixedpoint",
    "auto_degree": "graph",
    "neighbour_graph": "graph",
    "neighbours_of": "graph",
    "resolve_degree": "graph",
    "resolve_threshold": "graph",
    "KeyPair": "keys",
    "agree": "keys",
    "open_sealed": "keys",
    "seal": "keys",
    "KeyAdvert": "messages",
    "MaskedInput": "messages",
    "Roster": "messages",
    "RoundTag": "messages",
    "ShareCiphertext": "messages",
    "UnmaskReply": "messages",
    "UnmaskRequest": "messages",
    "MIN_PARTICIPANTS": "params",
    "SecAggParams": "params",
    "Signer": "params",
    "Verifier": "params",
    "graph_seed": "params",
    "expand_mask": "prg",
    "SecAggResult": "server",
    "SecAggServer": "server",
    "PRIME": "shamir",
    "Share": "shamir",
    "combine_shares": "shamir",
    "split_secret": "shamir",
}

__all__ = [
    "MIN_PARTICIPANTS",
    "PRIME",
    "FixedPoint",
    "KeyAdvert",
    "KeyPair",
    "MaskedInput",
    "Roster",
    "RoundTag",
    "SecAggClient",
    "SecAggParams",
    "SecAggResult",
    "SecAggServer",
    "Share",
    "ShareCiphertext",
    "Signer",
    "UnmaskReply",
    "UnmaskRequest",
    "Verifier",
    "agree",
    "auto_degree",
    "combine_shares",
    "expand_mask",
    "graph_seed",
    "neighbour_graph",
    "neighbours_of",
    "open_sealed",
    "resolve_degree",
    "resolve_threshold",
    "seal",
    "split_secret",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value
