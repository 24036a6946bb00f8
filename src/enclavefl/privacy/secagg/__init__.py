"""Secure aggregation (SecAgg, Bonawitz et al. 2017; SecAgg+, Bell et al. 2020) without transport.

The PS learns only the weighted sum of the surviving workers' quantized updates
and their total weight: each worker's upload is masked by pseudorandom vectors
that cancel in the sum, and the masks of workers that drop out are removed
from Shamir shares held by their neighbours. :class:`SecAggClient` and
:class:`SecAggServer` are plain state machines exchanging the dataclasses of
:mod:`enclavefl.privacy.secagg.messages`; the wire and the round engine drive them.
"""

from enclavefl.privacy.secagg.client import SecAggClient
from enclavefl.privacy.secagg.fixedpoint import FixedPoint
from enclavefl.privacy.secagg.graph import auto_degree, neighbour_graph, resolve_degree, resolve_threshold
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

__all__ = [
    "FixedPoint",
    "KeyAdvert",
    "KeyPair",
    "MIN_PARTICIPANTS",
    "MaskedInput",
    "PRIME",
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
    "open_sealed",
    "resolve_degree",
    "resolve_threshold",
    "seal",
    "split_secret",
]
