"""Attestation: DCAP quotes, their verification against Intel's PKI, evidence and policy."""

from enclavefl.attest.collateral import Collateral, CollateralFormatError
from enclavefl.attest.pccs import fetch_collateral, fetch_collateral_for_quote
from enclavefl.attest.pck import INTEL_SGX_ROOT_CA_SHA256, PckExtension, certificate_fingerprint, intel_sgx_root_ca
from enclavefl.attest.quote import (
    INTEL_QE_VENDOR_ID,
    Quote,
    QuoteFormatError,
    QuoteHeader,
    QuoteSignatureData,
    SgxAttributes,
    SgxReportBody,
    TdReportBody,
    parse_quote,
    qe_report_data_for,
    serialize_quote,
)
from enclavefl.attest.tcb import TcbEvaluation
from enclavefl.attest.verifier import QuoteVerification, verify_quote

__all__ = [
    "Collateral",
    "CollateralFormatError",
    "INTEL_QE_VENDOR_ID",
    "INTEL_SGX_ROOT_CA_SHA256",
    "PckExtension",
    "Quote",
    "QuoteFormatError",
    "QuoteHeader",
    "QuoteSignatureData",
    "QuoteVerification",
    "SgxAttributes",
    "SgxReportBody",
    "TcbEvaluation",
    "TdReportBody",
    "certificate_fingerprint",
    "fetch_collateral",
    "fetch_collateral_for_quote",
    "intel_sgx_root_ca",
    "parse_quote",
    "qe_report_data_for",
    "serialize_quote",
    "verify_quote",
]
