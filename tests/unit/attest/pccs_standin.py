"""A local PCCS stand-in: a real HTTPS server on 127.0.0.1 serving collateral as the PCCS v4 API does.

The TLS certificate comes from a test CA made here with ``cryptography``; a client
trusts it through ``ca_pem`` (the file a job's ``attestation.collateral.ca_cert``
names). The served bodies and issuer-chain headers are cut from collateral in the
combined JSON format, so the real sample collateral is served byte for byte.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import json
import ssl
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enclavefl.attest.pccs import HttpGet, urllib_get

SAMPLE_FMSPC = "00A067110000"  # the FMSPC in the sample quote's PCK certificate


def pccs_routes(parts: dict[str, str], fmspc: str = SAMPLE_FMSPC, ca: str = "processor") -> dict[str, tuple[bytes, dict[str, str]]]:
    """PCCS v4 responses (path -> body, headers) for collateral in the combined JSON format."""

    def chain(pem: str) -> str:  # issuer chains travel URL-encoded in headers
        return urllib.parse.quote(pem, safe="")

    return {
        f"/sgx/certification/v4/pckcrl?ca={ca}&encoding=der": (
            bytes.fromhex(parts["pck_crl"]), {"SGX-PCK-CRL-Issuer-Chain": chain(parts["pck_crl_issuer_chain"])}),
        f"/sgx/certification/v4/tcb?fmspc={fmspc}": (
            b'{"tcbInfo":%s,"signature":"%s"}' % (parts["tcb_info"].encode(), parts["tcb_info_signature"].encode()),
            {"TCB-Info-Issuer-Chain": chain(parts["tcb_info_issuer_chain"])}),
        "/sgx/certification/v4/qe/identity": (
            b'{"enclaveIdentity":%s,"signature":"%s"}' % (parts["qe_identity"].encode(),
                                                          parts["qe_identity_signature"].encode()),
            {"SGX-Enclave-Identity-Issuer-Chain": chain(parts["qe_identity_issuer_chain"])}),
        "/sgx/certification/v4/rootcacrl": (parts["root_ca_crl"].encode(), {}),
    }


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def write_tls_material(directory: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate for 127.0.0.1; returns (ca.pem, server.pem, server.key)."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("Test PCCS CA")).issuer_name(_name("Test PCCS CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    ca_pem, cert_pem, key_pem = directory / "pccs-ca.pem", directory / "pccs.pem", directory / "pccs.key"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return ca_pem, cert_pem, key_pem


class PccsStandIn:
    """Serves ``routes`` over HTTPS on 127.0.0.1 until :meth:`stop`; counts the requests it answers."""

    def __init__(self, routes: dict[str, tuple[bytes, dict[str, str]]], tls_dir: Path) -> None:
        self.routes = dict(routes)
        self.requests: list[str] = []
        self.ca_pem, cert, key = write_tls_material(tls_dir)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server hook's name
                stand_in.requests.append(self.path)
                found = stand_in.routes.get(self.path)
                body, headers = found if found is not None else (b"", {})
                self.send_response(200 if found is not None else 404)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the hook's signature
                pass

        self._server = HTTPServer(("127.0.0.1", 0), Handler)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=functools.partial(self._server.serve_forever, poll_interval=0.05),
                                        name="pccs-stand-in", daemon=True)
        self._thread.start()
        self._stopped = False

    def http_get(self) -> HttpGet:
        """The default transport, trusting only this stand-in's test CA."""
        return functools.partial(urllib_get, ssl_context=ssl.create_default_context(cafile=str(self.ca_pem)))

    def stop(self) -> None:
        """Shut the server down: later requests find the port closed."""
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def sample_parts(ra_samples: Path) -> dict[str, str]:
    """The real sample collateral, in the combined JSON format."""
    parts: dict[str, str] = json.loads((ra_samples / "quotes" / "sgx_v3_phala_dcap-qvl.collateral.json").read_text())
    return parts
