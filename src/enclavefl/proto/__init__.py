"""Generated protobuf and gRPC stubs for ``enclavefl.v1`` (regenerate with ``make proto``)."""

PROTOCOL_VERSION = 1
"""Carried in every envelope; bump it on any incompatible wire change."""

__all__ = ["PROTOCOL_VERSION"]
