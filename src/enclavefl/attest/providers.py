"""Evidence providers: where a node's quote comes from.

A provider turns 64 bytes of report data (which bind the node's TLS key) into
a raw DCAP quote. Three implementations:

- :class:`GramineProvider` asks the real hardware through Gramine's
  ``/dev/attestation`` pseudo-files (write ``user_report_data``, read ``quote``).
- :class:`SimulatedProvider` builds a quote in exactly the SGX v3 layout,
  every signature valid, but chained to an operator's simulated root instead
  of Intel's. It is for development on machines without SGX; peers accept it
  only when their policy says so, and every log line says it is not a TEE.
- :class:`NoneProvider` has no evidence at all (plain mutual TLS).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar, Final, final

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from enclavefl.attest.measurement import CodeMeasurement, signer_id
from enclavefl.attest.quote import (
    Quote,
    QuoteHeader,
    QuoteSignatureData,
    SgxAttributes,
    SgxReportBody,
    qe_report_data_for,
    serialize_quote,
)
from enclavefl.attest.simroot import SimRoot
from enclavefl.errors import AttestationError

__all__ = [
    "EvidenceProvider",
    "GramineProvider",
    "NoneProvider",
    "REPORT_DATA_SIZE",
    "SimulatedProvider",
]

logger = logging.getLogger(__name__)

REPORT_DATA_SIZE: Final = 64
_QUOTE_MAX_BYTES: Final = 8192  # Gramine's QUOTE_MAX_SIZE
# SGX attribute flags (gramine sgx_arch.h): a production enclave is INIT | MODE64BIT.
_FLAG_INIT, _FLAG_DEBUG, _FLAG_MODE64BIT, _FLAG_PROVISION_KEY = 0x01, 0x02, 0x04, 0x10
_XFRM_X87_SSE_AVX: Final = 0x07
# What Intel's production SGX Quoting Enclave reports about itself (LAYOUTS.md §4).
_INTEL_QE_MR_SIGNER: Final = bytes.fromhex("8c4f5775d796503e96137f77c68a829a0056ac8ded70140b081b094490c57bff")
_QE_ISV_PROD_ID: Final = 1
_QE_AUTH_DATA: Final = bytes(range(32))


def _check_report_data(report_data: bytes) -> bytes:
    if not isinstance(report_data, (bytes, bytearray, memoryview)):
        raise AttestationError(f"report_data must be bytes, got {type(report_data).__name__}")
    data = bytes(report_data)
    if len(data) != REPORT_DATA_SIZE:
        raise AttestationError(f"report_data must be {REPORT_DATA_SIZE} bytes, got {len(data)}")
    return data


class EvidenceProvider(ABC):
    """Produces attestation evidence that binds caller-chosen report data.

    Attributes:
        kind: ``"gramine"``, ``"simulated"`` or ``"none"`` (how peers should read it).
    """

    kind: ClassVar[str]

    @abstractmethod
    def quote(self, report_data: bytes) -> bytes:
        """Return a raw DCAP quote whose report_data is exactly ``report_data``.

        May block on the quoting enclave (tens of milliseconds on real hardware).
        Nothing is cached between calls: each quote is fresh.

        Args:
            report_data: 64 bytes, typically SHA-256 of a public key then zeros.

        Raises:
            AttestationError: wrong report_data size, or no evidence can be made.
        """


@final
class GramineProvider(EvidenceProvider):
    """Real SGX evidence through Gramine's ``/dev/attestation`` pseudo-files.

    The pseudo-files are process-global state (write report data, then read the
    quote for it), so calls are serialised with a lock.
    """

    kind: ClassVar[str] = "gramine"
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, device_dir: Path = Path("/dev/attestation")) -> None:
        self.device_dir = Path(device_dir)

    def __repr__(self) -> str:
        return f"GramineProvider(device_dir={str(self.device_dir)!r})"

    def quote(self, report_data: bytes) -> bytes:
        data = _check_report_data(report_data)
        type_file = self.device_dir / "attestation_type"
        quote_file = self.device_dir / "quote"
        try:
            with self._lock:
                if type_file.exists():
                    kind = type_file.read_text(encoding="ascii", errors="replace").strip()
                    if kind != "dcap":
                        raise AttestationError(
                            f"{type_file}: attestation type is {kind!r}, need 'dcap' "
                            '(set sgx.remote_attestation = "dcap" in the manifest)'
                        )
                with (self.device_dir / "user_report_data").open("wb") as stream:
                    stream.write(data)
                with quote_file.open("rb") as stream:
                    raw = stream.read(_QUOTE_MAX_BYTES + 1)
        except FileNotFoundError as exc:
            raise AttestationError(
                f"{exc.filename}: not found; is this process running under Gramine-SGX with remote attestation?"
            ) from exc
        except OSError as exc:
            raise AttestationError(f"{self.device_dir}: cannot get a quote: {exc}") from exc
        if not raw:
            raise AttestationError(f"{quote_file}: returned no quote")
        if len(raw) > _QUOTE_MAX_BYTES:
            raise AttestationError(f"{quote_file}: quote larger than {_QUOTE_MAX_BYTES} bytes")
        logger.debug("got a %d-byte quote from %s", len(raw), quote_file)
        return raw


@final
class SimulatedProvider(EvidenceProvider):
    """SGX v3 quotes signed by a simulated root: development only, NOT A REAL TEE.

    The ISV body carries the simulated MRENCLAVE (:func:`measure_code`) and the
    MRSIGNER of the sim root's signer key. The QE report, its PCK signature and
    the PCK chain (type 5, NUL-terminated PEM) are built once; each quote then
    costs one ECDSA signature by the attestation key.
    """

    kind: ClassVar[str] = "simulated"

    def __init__(
        self,
        simroot: SimRoot,
        measurement: CodeMeasurement,
        *,
        isv_prod_id: int = 0,
        isv_svn: int = 0,
        debug: bool = False,
    ) -> None:
        """Prepare the parts that do not depend on report data.

        Args:
            simroot: loaded simulated root material.
            measurement: the code measurement that becomes MRENCLAVE.
            isv_prod_id: product id to report (0..65535).
            isv_svn: security version to report (0..65535).
            debug: set the DEBUG attribute (peers refuse it unless allow_debug).

        Raises:
            AttestationError: isv_prod_id or isv_svn out of range.
        """
        for name, value in (("isv_prod_id", isv_prod_id), ("isv_svn", isv_svn)):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0xFFFF:
                raise AttestationError(f"{name} must be 0..65535, got {value!r}")
        self._simroot = simroot
        self._measurement = measurement
        self._attestation_key = simroot.attestation_key
        attestation_point = simroot.attestation_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )[1:]  # raw X || Y, as the quote stores it
        qe_id = hashlib.sha256(b"enclavefl simulated QE id" + attestation_point).digest()[:16]
        self._header = QuoteHeader(qe_svn=0, pce_svn=0, user_data=qe_id + bytes(4))
        flags = _FLAG_INIT | _FLAG_MODE64BIT | (_FLAG_DEBUG if debug else 0)
        self._attributes = SgxAttributes(flags=flags, xfrm=_XFRM_X87_SSE_AVX)
        self._mr_signer = signer_id(simroot.signer_key.public_key())
        self._isv_prod_id = isv_prod_id
        self._isv_svn = isv_svn
        qe_report = SgxReportBody(
            attributes=SgxAttributes(flags=_FLAG_INIT | _FLAG_MODE64BIT | _FLAG_PROVISION_KEY, xfrm=_XFRM_X87_SSE_AVX),
            mr_enclave=hashlib.sha256(b"enclavefl simulated quoting enclave").digest(),
            mr_signer=_INTEL_QE_MR_SIGNER,
            isv_prod_id=_QE_ISV_PROD_ID,
            report_data=qe_report_data_for(attestation_point, _QE_AUTH_DATA),
        )
        self._qe_report = qe_report
        self._qe_report_signature = _raw_signature(simroot.pck_leaf_key, qe_report.to_bytes())
        self._attestation_point = attestation_point
        logger.warning(
            "SIMULATED evidence provider (NOT A REAL TEE): mr_enclave=%s mr_signer=%s root=%s",
            measurement.mr_enclave.hex()[:16],
            self._mr_signer.hex()[:16],
            simroot.root_fingerprint[:16],
        )

    def __repr__(self) -> str:
        return (
            f"SimulatedProvider(mr_enclave={self._measurement.mr_enclave.hex()[:16]}..., "
            f"root={self._simroot.root_fingerprint[:16]}..., NOT A REAL TEE)"
        )

    @property
    def mr_enclave(self) -> bytes:
        return self._measurement.mr_enclave

    @property
    def mr_signer(self) -> bytes:
        return self._mr_signer

    def quote(self, report_data: bytes) -> bytes:
        data = _check_report_data(report_data)
        body = SgxReportBody(
            attributes=self._attributes,
            mr_enclave=self._measurement.mr_enclave,
            mr_signer=self._mr_signer,
            isv_prod_id=self._isv_prod_id,
            isv_svn=self._isv_svn,
            report_data=data,
        )
        signature = _raw_signature(self._attestation_key, self._header.to_bytes() + body.to_bytes())
        signature_data = QuoteSignatureData.with_pck_chain(
            signature=signature,
            attestation_key=self._attestation_point,
            qe_report=self._qe_report,
            qe_report_signature=self._qe_report_signature,
            qe_auth_data=_QE_AUTH_DATA,
            pck_chain=self._simroot.pck_chain,
        )
        raw = serialize_quote(Quote.build_sgx_v3(header=self._header, body=body, signature_data=signature_data))
        logger.debug("made a %d-byte SIMULATED quote (NOT A REAL TEE)", len(raw))
        return raw


@final
class NoneProvider(EvidenceProvider):
    """No evidence: the node relies on plain mutual TLS under the per-job CA."""

    kind: ClassVar[str] = "none"

    def __repr__(self) -> str:
        return "NoneProvider()"

    def quote(self, report_data: bytes) -> bytes:
        raise AttestationError("attestation mode is 'none': this node has no evidence to give")


def _raw_signature(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    """ECDSA-P256-SHA256 as a quote stores it: r || s, 32 big-endian bytes each."""
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")
