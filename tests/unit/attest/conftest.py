"""Fixtures for the attestation tests: the shared real samples, and a self-made DCAP PKI.

``SimDcap`` is a complete, real (not mocked) DCAP hierarchy under a test root:
root CA -> PCK CA -> PCK leaf (with an SGX extension), a TCB signing certificate,
CRLs, and signed TCB info / QE identity. It lets tests exercise what the public
samples cannot show: revocation, other roots, chosen TCB levels, TDX TCB info.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from enclavefl.attest.collateral import Collateral
from enclavefl.attest.pck import PckExtension
from enclavefl.attest.quote import (
    TEE_TYPE_TDX,
    Quote,
    QuoteHeader,
    QuoteSignatureData,
    SgxAttributes,
    SgxReportBody,
    TdReportBody,
    qe_report_data_for,
)

SHARED = Path(__file__).resolve().parents[3] / ".." / "shared"
RA_SAMPLES = SHARED / "ra-samples"
NOW = datetime(2025, 6, 20, tzinfo=timezone.utc)
QE_MR_SIGNER = bytes.fromhex("8c4f5775d796503e96137f77c68a829a0056ac8ded70140b081b094490c57bff")
SEAM_SIGNER = bytes(48)
FMSPC = bytes.fromhex("00906ed50000")
DEFAULT_COMPONENTS = (5, 5, 2, 2, 3, 1, 0, 3) + (0,) * 8


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that read the shared samples carry the ``shared`` marker (deselect with -m "not shared")."""
    for item in items:
        if "ra_samples" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.shared)


@pytest.fixture(scope="session")
def ra_samples() -> Path:
    if not (RA_SAMPLES / "quotes").is_dir():
        pytest.skip("the shared ra-samples folder (../shared/ra-samples beside the repo) is absent")
    return RA_SAMPLES


def raw_sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA-P256-SHA256 as DCAP encodes it: raw r||s."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "enclavefl tests")]
    )


def _cert(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, issuer_key: ec.EllipticCurvePrivateKey,
    *, ca: bool, extra: Sequence[x509.ExtensionType] = (),
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime(2020, 1, 1, tzinfo=timezone.utc))
        .not_valid_after(datetime(2040, 1, 1, tzinfo=timezone.utc))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    for ext in extra:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _components(values: Sequence[int]) -> list[dict[str, int]]:
    return [{"svn": v} for v in values]


class SimDcap:
    """A self-made DCAP PKI that issues quotes and collateral like Intel's."""

    def __init__(self, *, tcb_components: Sequence[int] = DEFAULT_COMPONENTS, pce_svn: int = 13) -> None:
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = _cert("Test SGX Root CA", self.root_key, _name("Test SGX Root CA"), self.root_key, ca=True)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.pck_ca = _cert("Test PCK CA", self.ca_key, self.root.subject, self.root_key, ca=True)
        self.leaf_key = ec.generate_private_key(ec.SECP256R1())
        self.extension = PckExtension(
            tcb_components=tuple(tcb_components), pce_svn=pce_svn, cpu_svn=bytes(tcb_components),
            fmspc=FMSPC, pce_id=bytes(2), ppid=bytes(range(16)),
        )
        self.leaf = _cert("Test PCK Certificate", self.leaf_key, self.pck_ca.subject, self.ca_key, ca=False,
                          extra=[self.extension.to_extension()])
        self.tcb_key = ec.generate_private_key(ec.SECP256R1())
        # Named as Intel names its TCB signer: the verifier pins that name (QVL: "SGX TCB Signing").
        self.tcb_signer = _cert("Intel SGX TCB Signing", self.tcb_key, self.root.subject, self.root_key, ca=False)
        self.attestation_key = ec.generate_private_key(ec.SECP256R1())

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        return (self.leaf, self.pck_ca, self.root)

    def qe_report(self, *, qe_auth_data: bytes = bytes(range(32)), isv_svn: int = 8) -> SgxReportBody:
        point = self.attestation_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )[1:]
        return SgxReportBody(
            mr_signer=QE_MR_SIGNER, isv_prod_id=1, isv_svn=isv_svn, attributes=SgxAttributes(flags=0x15, xfrm=0xE7),
            report_data=qe_report_data_for(point, qe_auth_data),
        )

    def _signature_data(self, signed: bytes, qe_isv_svn: int, wrapped: bool) -> QuoteSignatureData:
        auth = bytes(range(32))
        qe_report = self.qe_report(qe_auth_data=auth, isv_svn=qe_isv_svn)
        point = self.attestation_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )[1:]
        return QuoteSignatureData.with_pck_chain(
            signature=raw_sign(self.attestation_key, signed), attestation_key=point, qe_report=qe_report,
            qe_report_signature=raw_sign(self.leaf_key, qe_report.to_bytes()), qe_auth_data=auth,
            pck_chain=self.chain, wrapped=wrapped,
        )

    def sgx_quote(self, body: SgxReportBody | None = None, *, qe_isv_svn: int = 8) -> Quote:
        header = QuoteHeader(qe_svn=qe_isv_svn, pce_svn=13)
        body = body or SgxReportBody(mr_enclave=b"\x11" * 32, mr_signer=b"\x22" * 32, isv_svn=3,
                                     attributes=SgxAttributes(flags=0x05, xfrm=0xE7), report_data=b"sim".ljust(64, b"\0"))
        signed = header.to_bytes() + body.to_bytes()
        signature_data = self._signature_data(signed, qe_isv_svn, False)
        return Quote.build_sgx_v3(header=header, body=body, signature_data=signature_data)

    def tdx_quote(self, tee_tcb_svn: bytes, *, qe_isv_svn: int = 8) -> Quote:
        header = QuoteHeader(version=4, tee_type=TEE_TYPE_TDX)
        body = TdReportBody(tee_tcb_svn=tee_tcb_svn, mr_signer_seam=SEAM_SIGNER, mr_td=b"\x33" * 48,
                            td_attributes=bytes.fromhex("0000001000000000"))
        signed = header.to_bytes() + body.to_bytes()
        return Quote(header=header, body=body, signature_data=self._signature_data(signed, qe_isv_svn, True))

    def crl(self, issuer: x509.Certificate, key: ec.EllipticCurvePrivateKey, revoked: Sequence[x509.Certificate] = (),
            *, at: datetime = NOW) -> x509.CertificateRevocationList:
        builder = (x509.CertificateRevocationListBuilder().issuer_name(issuer.subject)
                   .last_update(at - timedelta(days=1)).next_update(at + timedelta(days=29)))
        for cert in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(cert.serial_number)
                .revocation_date(at - timedelta(days=2))
                .build()
            )
        return builder.sign(key, hashes.SHA256())

    def tcb_info(self, levels: Sequence[dict[str, Any]], *, tee: str = "SGX", at: datetime = NOW,
                 **extra: Any) -> str:
        info = {
            "id": tee, "version": 3, "issueDate": (at - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "nextUpdate": (at + timedelta(days=29)).strftime("%Y-%m-%dT%H:%M:%SZ"), "fmspc": FMSPC.hex().upper(),
            "pceId": "0000", "tcbType": 0, "tcbEvaluationDataNumber": 17, **extra, "tcbLevels": list(levels),
        }
        return json.dumps(info, separators=(",", ":"))

    def qe_identity(self, *, qe_id: str = "QE", at: datetime = NOW, mr_signer: bytes = QE_MR_SIGNER) -> str:
        ident = {
            "id": qe_id, "version": 2, "issueDate": (at - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "nextUpdate": (at + timedelta(days=29)).strftime("%Y-%m-%dT%H:%M:%SZ"), "tcbEvaluationDataNumber": 17,
            "miscselect": "00000000", "miscselectMask": "FFFFFFFF", "attributes": "11000000000000000000000000000000",
            "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000", "mrsigner": mr_signer.hex().upper(), "isvprodid": 1,
            "tcbLevels": [
                {"tcb": {"isvsvn": 8}, "tcbDate": "2024-03-13T00:00:00Z", "tcbStatus": "UpToDate"},
                {"tcb": {"isvsvn": 6}, "tcbDate": "2021-11-10T00:00:00Z", "tcbStatus": "OutOfDate",
                 "advisoryIDs": ["INTEL-SA-00615"]},
            ],
        }
        return json.dumps(ident, separators=(",", ":"))

    def combined(self, *, tcb_info: str | None = None, qe_identity: str | None = None, revoked_leaf: bool = False,
                 revoked_ca: bool = False, at: datetime = NOW) -> dict[str, str]:
        """Collateral in the combined JSON format (what ``Collateral.from_file`` reads)."""
        tcb_info = tcb_info or self.tcb_info([sgx_level(DEFAULT_COMPONENTS, 13, "UpToDate")], at=at)
        qe_identity = qe_identity or self.qe_identity(at=at)

        def pem(*certs: x509.Certificate) -> str:
            return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)

        def der_hex(crl: x509.CertificateRevocationList) -> str:
            return crl.public_bytes(serialization.Encoding.DER).hex()

        return {
            "pck_crl_issuer_chain": pem(self.pck_ca, self.root),
            "root_ca_crl": der_hex(self.crl(self.root, self.root_key, [self.pck_ca] if revoked_ca else [], at=at)),
            "pck_crl": der_hex(self.crl(self.pck_ca, self.ca_key, [self.leaf] if revoked_leaf else [], at=at)),
            "tcb_info_issuer_chain": pem(self.tcb_signer, self.root),
            "tcb_info": tcb_info,
            "tcb_info_signature": raw_sign(self.tcb_key, tcb_info.encode()).hex(),
            "qe_identity_issuer_chain": pem(self.tcb_signer, self.root),
            "qe_identity": qe_identity,
            "qe_identity_signature": raw_sign(self.tcb_key, qe_identity.encode()).hex(),
        }

    def collateral(self, **kwargs: Any) -> Collateral:
        return Collateral.from_parts(**self.combined(**kwargs))


def sgx_level(components: Sequence[int], pce_svn: int, status: str, advisories: Sequence[str] = (),
              tdx: Sequence[int] | None = None) -> dict[str, Any]:
    tcb: dict[str, Any] = {"sgxtcbcomponents": _components(components), "pcesvn": pce_svn}
    if tdx is not None:
        tcb["tdxtcbcomponents"] = _components(tdx)
    return {"tcb": tcb, "tcbDate": "2024-03-13T00:00:00Z", "tcbStatus": status, "advisoryIDs": list(advisories)}


@pytest.fixture(scope="session")
def sim_dcap() -> SimDcap:
    """One shared test PKI (building keys is the slow part)."""
    return SimDcap()


@pytest.fixture(scope="session")
def make_sim_dcap() -> type[SimDcap]:
    """The SimDcap class, for tests that need a platform with other TCB values."""
    return SimDcap


@pytest.fixture(scope="session")
def tcb_level() -> Any:
    """Builds one tcbInfo.tcbLevels entry: ``tcb_level(components, pcesvn, status, advisories, tdx)``."""
    return sgx_level
