"""How the worker's side reads a failed TLS handshake and a join refused for differing job settings."""

from __future__ import annotations

import grpc
import pytest

from enclavefl.errors import ConfigError
from enclavefl.transport.wire import SETTINGS_MISMATCH, error_from_rpc, tls_failure
from tests.unit.transport.test_wire import FailedCall

# What gRPC 1.85 reports, verbatim, for a PS certificate from another CA and for another server name.
OTHER_CA = ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:33157: Tls handshake failed "
            "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:"
            "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate: OK")
OTHER_NAME = ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:41863: Custom verification "
              "check failed with error: UNAUTHENTICATED: Hostname Verification Check failed.")


def test_a_certificate_from_another_ca_is_named() -> None:
    assert tls_failure(OTHER_CA) == (
        "the PS certificate failed verification (unable to get local issuer certificate): it is not from this node's CA"
    )


def test_a_certificate_for_another_name_is_named() -> None:
    reason = tls_failure(OTHER_NAME)

    assert reason is not None and "transport.tls.server_name" in reason


@pytest.mark.parametrize("details", [
    "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:1: Socket closed",
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Failed to connect to remote host: "
    "Connection refused",
])
def test_an_absent_or_closing_ps_is_not_a_tls_failure(details: str) -> None:
    assert tls_failure(details) is None


def test_a_join_refused_for_differing_settings_is_a_config_error() -> None:
    details = f"Join refused: worker 'w': {SETTINGS_MISMATCH} from the PS's in task.params"

    error = error_from_rpc(FailedCall(grpc.StatusCode.FAILED_PRECONDITION, details), "Join ps:7443")

    assert isinstance(error, ConfigError)
    assert str(error) == f"Join ps:7443: {details}"
