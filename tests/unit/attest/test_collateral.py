"""Collateral: Intel's signed TCB info / QE identity / CRLs give the TCB status, and tampering is refused."""

from __future__ import annotations

import json
import urllib.parse
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from enclavefl.attest.collateral import Collateral, CollateralFormatError, split_signed_envelope
from enclavefl.attest.pccs import HttpResponse, fetch_collateral, fetch_collateral_for_quote
from enclavefl.attest.pck import PckExtension, parse_pck_extension, pck_ca_kind
from enclavefl.attest.quote import parse_quote
from enclavefl.attest.tcb import parse_tcb_info
from enclavefl.attest.verifier import verify_quote
from enclavefl.errors import AttestationError, ConfigError, Unavailable, VerificationError

AT = datetime(2025, 6, 20, tzinfo=timezone.utc)  # inside the sample collateral's window (2025-06-19..07-19)
PHALA = "sgx_v3_phala_dcap-qvl.bin"
COLLATERAL = "sgx_v3_phala_dcap-qvl.collateral.json"


def _quote(ra_samples: Path) -> bytes:
    return (ra_samples / "quotes" / PHALA).read_bytes()


def _combined(ra_samples: Path) -> dict[str, str]:
    data: dict[str, str] = json.loads((ra_samples / "quotes" / COLLATERAL).read_text())
    return data


def test_sample_collateral_gives_the_tcb_status_and_advisories_its_source_states(ra_samples: Path) -> None:
    collateral = Collateral.from_file(ra_samples / "quotes" / COLLATERAL)
    result = verify_quote(_quote(ra_samples), at=AT, collateral=collateral)
    assert result.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert result.advisory_ids == ("INTEL-SA-00289", "INTEL-SA-00615")
    assert result.checked[-4:] == ("collateral", "revocation", "qe_identity", "tcb_level")
    assert result.tcb is not None and (result.tcb.qe_status, result.tcb.platform_status) == (
        "UpToDate", "ConfigurationAndSWHardeningNeeded",
    )
    assert result.pck is not None and result.pck.fmspc.hex() == "00a067110000"


@pytest.mark.parametrize(
    ("at", "field"),
    [
        (datetime(2025, 7, 25, tzinfo=timezone.utc), "pck_crl.validity"),
        (datetime(2025, 6, 19, 10, 30, tzinfo=timezone.utc), "tcb_info.validity"),
        (datetime(2025, 6, 19, 10, 0, tzinfo=timezone.utc), "pck_crl.validity"),
    ],
)
def test_collateral_outside_its_validity_is_refused(ra_samples: Path, at: datetime, field: str) -> None:
    collateral = Collateral.from_file(ra_samples / "quotes" / COLLATERAL)
    with pytest.raises(VerificationError) as info:
        verify_quote(_quote(ra_samples), at=at, collateral=collateral)
    assert info.value.field == field
    assert info.value.actual == at.isoformat()


@pytest.mark.parametrize(
    ("key", "old", "new", "field"),
    [
        ("tcb_info", '"tcbStatus":"ConfigurationAndSWHardeningNeeded"', '"tcbStatus":"UpToDate"', "tcb_info.signature"),
        ("tcb_info", '"nextUpdate":"2025-07-19', '"nextUpdate":"2035-07-19', "tcb_info.signature"),
        ("qe_identity", '"isvsvn":8', '"isvsvn":7', "qe_identity.signature"),
    ],
)
def test_tampered_signed_json_is_refused(ra_samples: Path, key: str, old: str, new: str, field: str) -> None:
    parts = _combined(ra_samples)
    assert old in parts[key]
    parts[key] = parts[key].replace(old, new, 1)
    with pytest.raises(VerificationError) as info:
        verify_quote(_quote(ra_samples), at=AT, collateral=Collateral.from_parts(**parts))
    assert info.value.field == field


COLLATERAL_KEYS = [
    "pck_crl_issuer_chain", "root_ca_crl", "pck_crl", "tcb_info_issuer_chain", "tcb_info", "tcb_info_signature",
    "qe_identity_issuer_chain", "qe_identity", "qe_identity_signature",
]


@pytest.mark.parametrize("key", COLLATERAL_KEYS)
def test_a_flipped_bit_in_any_collateral_piece_is_refused(ra_samples: Path, key: str) -> None:
    parts = _combined(ra_samples)
    quote = parse_quote(_quote(ra_samples))
    hex_valued = key.endswith(("_crl", "_signature"))
    raw = bytes.fromhex(parts[key]) if hex_valued else parts[key].encode()
    for offset in range(0, len(raw), max(1, len(raw) // 40)):
        mutated = bytearray(raw)
        mutated[offset] ^= 1 << (offset % 7)  # low bits: stays ASCII in the text pieces
        changed = dict(parts, **{key: mutated.hex() if hex_valued else mutated.decode()})
        with pytest.raises(AttestationError):
            verify_quote(quote, at=AT, collateral=Collateral.from_parts(**changed))


def test_a_crl_signed_by_someone_else_is_refused(ra_samples: Path, sim_dcap: Any) -> None:
    parts = _combined(ra_samples)
    parts["pck_crl"] = sim_dcap.crl(sim_dcap.pck_ca, sim_dcap.ca_key).public_bytes(Encoding.DER).hex()
    with pytest.raises(VerificationError) as info:
        verify_quote(_quote(ra_samples), at=AT, collateral=Collateral.from_parts(**parts))
    assert info.value.field == "pck_crl.signature"


def test_pcs_envelopes_and_der_or_pem_crls_load_the_same(ra_samples: Path) -> None:
    parts = _combined(ra_samples)
    root_crl = bytes.fromhex(parts["root_ca_crl"])
    envelope = Collateral.from_parts(
        tcb_info='{"tcbInfo": %s, "signature":"%s"}' % (parts["tcb_info"], parts["tcb_info_signature"]),
        qe_identity='{"enclaveIdentity":%s,\n "signature": "%s"}\n' % (parts["qe_identity"], parts["qe_identity_signature"]),
        tcb_info_issuer_chain=parts["tcb_info_issuer_chain"],
        qe_identity_issuer_chain=parts["qe_identity_issuer_chain"].encode(),
        root_ca_crl=root_crl,
        pck_crl=Collateral.from_file(ra_samples / "quotes" / COLLATERAL).pck_crl.public_bytes(Encoding.PEM),
        pck_crl_issuer_chain=parts["pck_crl_issuer_chain"],
    )
    assert envelope.tcb_info_body == parts["tcb_info"].encode()
    result = verify_quote(_quote(ra_samples), at=AT, collateral=envelope)
    assert result.tcb_status == "ConfigurationAndSWHardeningNeeded"


def test_split_signed_envelope_keeps_the_exact_bytes() -> None:
    body = b'{ "signature" : "ab", "tcbInfo" : {"b": 1,  "a" : [1, {"x":"}"}]} }'
    inner, signature = split_signed_envelope(body, "tcbInfo")
    assert (inner, signature) == (b'{"b": 1,  "a" : [1, {"x":"}"}]}', "ab")
    with pytest.raises(CollateralFormatError, match="tcbInfo"):
        split_signed_envelope(b'{"tcbInfo": {}}', "tcbInfo")
    with pytest.raises(CollateralFormatError, match="envelope"):
        split_signed_envelope(b'{"tcbInfo": {}, "signature": "ab"} trailing', "tcbInfo")


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("tcb_info_signature", "zz", "tcb_info_signature: not hex"),
        ("qe_identity_signature", "00" * 10, "64-byte"),
        ("root_ca_crl", "3082", "root_ca_crl"),
        ("pck_crl_issuer_chain", "not pem", "pck_crl_issuer_chain"),
        ("tcb_info", '{"version":3}', "tcbInfo"),
    ],
)
def test_malformed_collateral_names_the_key(ra_samples: Path, tmp_path: Path, key: str, value: str, match: str) -> None:
    parts = _combined(ra_samples)
    parts[key] = value
    path = tmp_path / "collateral.json"
    path.write_text(json.dumps(parts))
    with pytest.raises(CollateralFormatError, match=match):
        Collateral.from_file(path)


def test_collateral_file_missing_a_key_is_refused(ra_samples: Path, tmp_path: Path) -> None:
    parts = _combined(ra_samples)
    del parts["pck_crl"]
    path = tmp_path / "collateral.json"
    path.write_text(json.dumps(parts))
    with pytest.raises(CollateralFormatError, match="pck_crl: missing"):
        Collateral.from_file(path)
    with pytest.raises(CollateralFormatError, match="cannot read"):
        Collateral.from_file(tmp_path / "absent.json")


# -- self-made PKI: revocation, roots, TCB levels ---------------------------------


def test_sim_collateral_verifies_only_with_its_root_trusted(sim_dcap: Any) -> None:
    quote = sim_dcap.sgx_quote()
    collateral = sim_dcap.collateral()
    result = verify_quote(quote, at=AT, trusted_roots=[sim_dcap.root], collateral=collateral)
    assert (result.tcb_status, result.advisory_ids) == ("UpToDate", ())
    with pytest.raises(VerificationError) as info:
        verify_quote(quote, at=AT, collateral=collateral)
    assert info.value.field == "pck_chain.root"


def test_intel_quote_with_collateral_from_another_root_is_refused(ra_samples: Path, sim_dcap: Any) -> None:
    from enclavefl.attest.pck import intel_sgx_root_ca

    with pytest.raises(VerificationError) as info:
        verify_quote(_quote(ra_samples), at=AT, trusted_roots=[intel_sgx_root_ca(), sim_dcap.root],
                     collateral=sim_dcap.collateral())
    assert info.value.field == "collateral.root"


def test_a_revoked_pck_leaf_is_refused(sim_dcap: Any) -> None:
    with pytest.raises(VerificationError) as info:
        verify_quote(sim_dcap.sgx_quote(), at=AT, trusted_roots=[sim_dcap.root],
                     collateral=sim_dcap.collateral(revoked_leaf=True))
    assert info.value.field == "pck_chain[0].revocation"
    assert "revoked on" in str(info.value)


def test_a_revoked_pck_ca_is_refused(sim_dcap: Any) -> None:
    with pytest.raises(VerificationError) as info:
        verify_quote(sim_dcap.sgx_quote(), at=AT, trusted_roots=[sim_dcap.root],
                     collateral=sim_dcap.collateral(revoked_ca=True))
    assert info.value.field == "pck_crl_issuer_chain[0].revocation"


@pytest.mark.parametrize(
    ("qe_svn", "status", "advisories"),
    [(8, "ConfigurationNeeded", ("INTEL-SA-00001",)),
     (6, "OutOfDateConfigurationNeeded", ("INTEL-SA-00001", "INTEL-SA-00615"))],
)
def test_tcb_status_comes_from_the_first_level_met_and_the_qe_level(
    make_sim_dcap: Any, tcb_level: Any, qe_svn: int, status: str, advisories: tuple[str, ...]
) -> None:
    sim = make_sim_dcap(tcb_components=(5, 5, 2, 2, 3, 1, 0, 3) + (0,) * 8, pce_svn=13)
    levels = [
        tcb_level((6,) * 8 + (0,) * 8, 13, "UpToDate"),  # component 0 too low: skipped
        tcb_level((5, 5, 2, 2, 3, 1, 0, 3) + (0,) * 8, 14, "SWHardeningNeeded"),  # PCESVN too low
        tcb_level((5, 5, 2, 2, 3, 1, 0, 0) + (0,) * 8, 13, "ConfigurationNeeded", ["INTEL-SA-00001"]),
        tcb_level((1,) * 8 + (0,) * 8, 10, "OutOfDate", ["INTEL-SA-00002"]),
    ]
    collateral = sim.collateral(tcb_info=sim.tcb_info(levels))
    result = verify_quote(sim.sgx_quote(qe_isv_svn=qe_svn), at=AT, trusted_roots=[sim.root], collateral=collateral)
    assert (result.tcb_status, result.advisory_ids) == (status, advisories)


def test_a_platform_below_every_level_is_refused(sim_dcap: Any, tcb_level: Any) -> None:
    collateral = sim_dcap.collateral(tcb_info=sim_dcap.tcb_info([tcb_level((9,) * 16, 13, "UpToDate")]))
    with pytest.raises(VerificationError) as info:
        verify_quote(sim_dcap.sgx_quote(), at=AT, trusted_roots=[sim_dcap.root], collateral=collateral)
    assert info.value.field == "tcb_info.tcbLevels"


def test_tcb_info_for_another_fmspc_is_refused(sim_dcap: Any, tcb_level: Any) -> None:
    tcb_info = sim_dcap.tcb_info([tcb_level((0,) * 16, 0, "UpToDate")]).replace("00906ED50000", "00A067110000")
    with pytest.raises(VerificationError) as info:
        verify_quote(sim_dcap.sgx_quote(), at=AT, trusted_roots=[sim_dcap.root],
                     collateral=sim_dcap.collateral(tcb_info=tcb_info))
    assert info.value.field == "tcb_info.fmspc"


def test_a_qe_that_is_not_intels_is_refused(sim_dcap: Any) -> None:
    collateral = sim_dcap.collateral(qe_identity=sim_dcap.qe_identity(mr_signer=b"\x01" * 32))
    with pytest.raises(VerificationError) as info:
        verify_quote(sim_dcap.sgx_quote(), at=AT, trusted_roots=[sim_dcap.root], collateral=collateral)
    assert info.value.field == "qe_report.mr_signer"


def test_a_td_qe_identity_is_refused_for_an_sgx_quote(sim_dcap: Any) -> None:
    collateral = sim_dcap.collateral(qe_identity=sim_dcap.qe_identity(qe_id="TD_QE"))
    with pytest.raises(VerificationError) as info:
        verify_quote(sim_dcap.sgx_quote(), at=AT, trusted_roots=[sim_dcap.root], collateral=collateral)
    assert info.value.field == "qe_identity.id"


def test_tdx_tcb_uses_the_tdx_components_and_module(sim_dcap: Any, tcb_level: Any) -> None:
    sgx = (5, 5, 2, 2, 3, 1, 0, 3) + (0,) * 8
    levels = [
        tcb_level(sgx, 13, "UpToDate", tdx=(5, 0, 4) + (0,) * 13),
        tcb_level(sgx, 13, "OutOfDate", ["INTEL-SA-00837"], tdx=(3, 0, 3) + (0,) * 13),
    ]
    module = {"mrsigner": "00" * 48, "attributes": "0000000000000000", "attributesMask": "FFFFFFFFFFFFFFFF"}
    tcb_info = sim_dcap.tcb_info(levels, tee="TDX", tdxModule=module)
    collateral = sim_dcap.collateral(tcb_info=tcb_info, qe_identity=sim_dcap.qe_identity(qe_id="TD_QE"))
    quote = sim_dcap.tdx_quote(bytes([3, 0, 5]) + bytes(13))
    result = verify_quote(quote.to_bytes(), at=AT, trusted_roots=[sim_dcap.root], collateral=collateral)
    assert (result.tee, result.tcb_status, result.advisory_ids) == ("tdx", "OutOfDate", ("INTEL-SA-00837",))
    assert result.mr_enclave == b"\x33" * 48 and not result.debug
    with pytest.raises(VerificationError) as info:
        verify_quote(quote, at=AT, trusted_roots=[sim_dcap.root], collateral=sim_dcap.collateral())
    assert info.value.field in ("qe_identity.id", "tcb_info.id")


def test_tcb_info_v2_layout_is_read() -> None:
    level = {"tcb": {**{f"sgxtcbcomp{i:02d}svn": i for i in range(1, 17)}, "pcesvn": 7},
             "tcbDate": "2020-01-01T00:00:00Z", "tcbStatus": "OutOfDate"}
    body = json.dumps({"version": 2, "issueDate": "2020-01-01T00:00:00Z", "nextUpdate": "2020-02-01T00:00:00Z",
                       "fmspc": "00906ED50000", "pceId": "0000", "tcbLevels": [level]}).encode()
    info = parse_tcb_info(body)
    assert info.tcb_levels[0].sgx_components == tuple(range(1, 17)) and info.tcb_levels[0].pce_svn == 7


# -- PCK extension -------------------------------------------------------------------


def test_pck_extension_round_trips_through_der(ra_samples: Path, sim_dcap: Any) -> None:
    leaf = parse_quote(_quote(ra_samples)).signature_data.pck_chain[0]
    extension = parse_pck_extension(leaf)
    assert extension.tcb_components == (11, 11, 2, 2, 255, 1) + (0,) * 10 and extension.pce_svn == 13
    raw = leaf.extensions.get_extension_for_oid(extension.to_extension().oid).value
    assert isinstance(raw, x509.UnrecognizedExtension) and extension.to_der() == raw.value
    assert parse_pck_extension(sim_dcap.leaf) == sim_dcap.extension
    assert isinstance(sim_dcap.extension, PckExtension)


def test_a_certificate_without_the_sgx_extension_is_refused(sim_dcap: Any) -> None:
    with pytest.raises(VerificationError, match="absent"):
        parse_pck_extension(sim_dcap.pck_ca)


# -- PCCS fetch (in-memory transport, file cache) -------------------------------------


class SampleServer:
    """An in-memory PCCS serving the sample collateral as Intel's v4 API does."""

    def __init__(self, parts: dict[str, str]) -> None:
        def quote_chain(pem: str) -> str:  # issuer chains travel URL-encoded in headers
            return urllib.parse.quote(pem, safe="")

        self.routes = {
            "/sgx/certification/v4/pckcrl?ca=processor&encoding=der": HttpResponse(
                200, bytes.fromhex(parts["pck_crl"]), {"SGX-PCK-CRL-Issuer-Chain": quote_chain(parts["pck_crl_issuer_chain"])}),
            "/sgx/certification/v4/tcb?fmspc=00A067110000": HttpResponse(
                200, b'{"tcbInfo":%s,"signature":"%s"}' % (parts["tcb_info"].encode(), parts["tcb_info_signature"].encode()),
                {"TCB-Info-Issuer-Chain": quote_chain(parts["tcb_info_issuer_chain"])}),
            "/sgx/certification/v4/qe/identity": HttpResponse(
                200, b'{"enclaveIdentity":%s,"signature":"%s"}' % (parts["qe_identity"].encode(),
                                                                  parts["qe_identity_signature"].encode()),
                {"SGX-Enclave-Identity-Issuer-Chain": quote_chain(parts["qe_identity_issuer_chain"])}),
            "/sgx/certification/v4/rootcacrl": HttpResponse(200, parts["root_ca_crl"].encode(), {}),
        }
        self.requests: list[str] = []

    def get(self, url: str, timeout_s: float) -> HttpResponse:
        self.requests.append(url)
        path = url.removeprefix("https://pccs.test")
        return self.routes.get(path, HttpResponse(404, b"", {}))


def _unreachable(url: str, timeout_s: float) -> HttpResponse:
    raise Unavailable(f"GET {url}: no network in tests")


def test_fetch_collateral_parses_pccs_responses_and_reuses_the_cache(ra_samples: Path, tmp_path: Path) -> None:
    server = SampleServer(_combined(ra_samples))
    quote = parse_quote(_quote(ra_samples))
    assert pck_ca_kind(quote.signature_data.pck_chain[1]) == "processor"
    url = "https://pccs.test/sgx/certification/v4/"
    fetched = fetch_collateral_for_quote(url, quote, tmp_path, http_get=server.get)
    assert len(server.requests) == 4
    assert verify_quote(quote, at=AT, collateral=fetched).tcb_status == "ConfigurationAndSWHardeningNeeded"

    cached = fetch_collateral("https://pccs.test", "00a067110000", "processor", tmp_path, http_get=_unreachable)
    assert cached.tcb_info_body == fetched.tcb_info_body and cached.qe_identity_body == fetched.qe_identity_body
    with pytest.raises(Unavailable):
        fetch_collateral(
            "https://pccs.test", "00a067110000", "processor", tmp_path, max_age_s=-1, http_get=_unreachable
        )


@pytest.mark.parametrize(
    ("url", "fmspc", "ca", "match"),
    [
        ("http://pccs.test", "00a067110000", "processor", "https"),
        ("https://pccs.test", "00a0671100", "processor", "fmspc"),
        ("https://pccs.test", "00a067110000", "intel", "ca"),
    ],
)
def test_fetch_collateral_refuses_bad_arguments(tmp_path: Path, url: str, fmspc: str, ca: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        fetch_collateral(url, fmspc, ca, tmp_path, http_get=_unreachable)


def test_collateral_validity_boundaries_are_inclusive(sim_dcap: Any) -> None:
    at = AT + timedelta(days=29)  # exactly nextUpdate of the sim TCB info, QE identity and CRLs
    result = verify_quote(sim_dcap.sgx_quote(), at=at, trusted_roots=[sim_dcap.root], collateral=sim_dcap.collateral())
    assert result.tcb_status == "UpToDate"
    with pytest.raises(VerificationError):
        verify_quote(sim_dcap.sgx_quote(), at=at + timedelta(seconds=1), trusted_roots=[sim_dcap.root],
                     collateral=sim_dcap.collateral())
