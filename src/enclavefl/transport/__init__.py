"""gRPC + TLS plumbing: credentials (per-job CA or attested RA-TLS), the PS service, the worker client.

The seam types are defined in :mod:`enclavefl.messages` (grpc-free) and re-exported here.
"""

from enclavefl.messages import (
    ClientSettings,
    FederationHandler,
    JoinInfo,
    PeerIdentity,
    PushResult,
    TaskInfo,
    TaskKind,
    UpdateMeta,
    UpdateSink,
)
from enclavefl.transport.attested import AttestedCredentials
from enclavefl.transport.audit import AuditLog, AuditRecord
from enclavefl.transport.certs import CertBundle, add_worker_cert, create_job_certs
from enclavefl.transport.client import FederationClient
from enclavefl.transport.credentials import (
    CaCredentials,
    ChannelSetup,
    Credentials,
    JoinProof,
    cert_fingerprint,
)
from enclavefl.transport.service import FederationServer

__all__ = [
    "AttestedCredentials",
    "AuditLog",
    "AuditRecord",
    "CaCredentials",
    "CertBundle",
    "ChannelSetup",
    "ClientSettings",
    "Credentials",
    "FederationClient",
    "FederationHandler",
    "FederationServer",
    "JoinInfo",
    "JoinProof",
    "PeerIdentity",
    "PushResult",
    "TaskInfo",
    "TaskKind",
    "UpdateMeta",
    "UpdateSink",
    "add_worker_cert",
    "cert_fingerprint",
    "create_job_certs",
]
