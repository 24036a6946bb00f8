"""Generated protobuf and gRPC stubs for ``enclavefl.v1`` (regenerate with ``make proto``)."""

PROTOCOL_VERSION = 2
"""Carried in every envelope; bump it on any incompatible wire change.

2: ClientSettings carries the local optimizer and client algorithm, Task a
config map, UpdateHeader a kind and an extensions map.
"""

__all__ = ["PROTOCOL_VERSION"]
