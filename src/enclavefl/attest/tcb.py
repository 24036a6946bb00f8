"""Intel TCB documents (tcbInfo, enclave identity) and the TCB status they give a quote.

How this works (Intel QVL, ``TcbLevelCheck.cpp`` / ``TdxModuleCheck.cpp``): the
platform's TCB (16 component SVNs + PCESVN from the PCK certificate) is matched
against ``tcbInfo.tcbLevels`` in order; the first level it meets or exceeds in
*every* component gives the platform status and advisories. For TDX the TD's
``tee_tcb_svn`` must also meet the level's ``tdxtcbcomponents`` (skipping the
first two when the TDX module version is non-zero) and the TDX module identity
gives a module status. The QE report is matched against the QE identity (mrsigner,
product id, masked miscselect/attributes) and its ISVSVN gives the QE status.
The statuses converge as in the QVL: e.g. an OutOfDate QE turns an UpToDate
platform into OutOfDate. Policy (which status to accept) is not decided here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from enclavefl.attest.pck import PckExtension
from enclavefl.attest.quote import SgxReportBody, TdReportBody
from enclavefl.errors import VerificationError

__all__ = [
    "EnclaveIdentity",
    "IdentityTcbLevel",
    "TCB_STATUSES",
    "TcbEvaluation",
    "TcbInfo",
    "TcbLevel",
    "TdxModuleIdentity",
    "evaluate_tcb",
    "match_qe_identity",
    "parse_enclave_identity",
    "parse_tcb_info",
]

TCB_STATUSES = frozenset(
    {
        "UpToDate",
        "SWHardeningNeeded",
        "ConfigurationNeeded",
        "ConfigurationAndSWHardeningNeeded",
        "OutOfDate",
        "OutOfDateConfigurationNeeded",
        "Revoked",
    }
)


@dataclass(frozen=True, slots=True)
class TcbLevel:
    sgx_components: tuple[int, ...]
    pce_svn: int
    tdx_components: tuple[int, ...]
    status: str
    date: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class IdentityTcbLevel:
    """A TCB level of an enclave or TDX module identity: ISVSVN threshold and status."""

    isv_svn: int
    status: str
    date: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TdxModuleIdentity:
    id: str
    mr_signer: bytes
    attributes: bytes
    attributes_mask: bytes
    tcb_levels: tuple[IdentityTcbLevel, ...]


@dataclass(frozen=True, slots=True)
class TcbInfo:
    """Intel's signed TCB info for one FMSPC (``id`` "SGX" or "TDX", version 2 or 3)."""

    id: str
    version: int
    issue_date: datetime
    next_update: datetime
    fmspc: bytes
    pce_id: bytes
    tcb_evaluation_data_number: int
    tcb_levels: tuple[TcbLevel, ...]
    tdx_module: TdxModuleIdentity | None
    tdx_module_identities: tuple[TdxModuleIdentity, ...]


@dataclass(frozen=True, slots=True)
class EnclaveIdentity:
    """Intel's signed identity of the QE (``id`` "QE" or "TD_QE")."""

    id: str
    version: int
    issue_date: datetime
    next_update: datetime
    tcb_evaluation_data_number: int
    misc_select: int
    misc_select_mask: int
    attributes: bytes
    attributes_mask: bytes
    mr_signer: bytes
    isv_prod_id: int
    tcb_levels: tuple[IdentityTcbLevel, ...]


# -- JSON reading: every accessor names the JSON path it refused -----------------


def _get(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], path: str) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ValueError(f"{path}.{key}: missing or not {getattr(kind, '__name__', kind)}")
    return value


def _hex(obj: Mapping[str, Any], key: str, size: int, path: str) -> bytes:
    try:
        raw = bytes.fromhex(_get(obj, key, str, path))
    except ValueError as exc:
        raise ValueError(f"{path}.{key}: not hex") from exc
    if len(raw) != size:
        raise ValueError(f"{path}.{key}: must be {size} bytes, got {len(raw)}")
    return raw


def _date(obj: Mapping[str, Any], key: str, path: str) -> datetime:
    text = _get(obj, key, str, path)
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"{path}.{key}: not an ISO 8601 time: {text!r}") from exc
    if value.tzinfo is None:
        raise ValueError(f"{path}.{key}: time without zone: {text!r}")
    return value


def _status(obj: Mapping[str, Any], path: str) -> str:
    status = _get(obj, "tcbStatus", str, path)
    if status not in TCB_STATUSES:
        raise ValueError(f"{path}.tcbStatus: unknown status {status!r}")
    return str(status)


def _advisories(obj: Mapping[str, Any], path: str) -> tuple[str, ...]:
    ids = obj.get("advisoryIDs", [])
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ValueError(f"{path}.advisoryIDs: must be a list of strings")
    return tuple(ids)


def _svn_list(obj: Mapping[str, Any], key: str, path: str) -> tuple[int, ...]:
    items = _get(obj, key, list, path)
    if len(items) != 16:
        raise ValueError(f"{path}.{key}: needs 16 components, got {len(items)}")
    return tuple(_get(_obj(c, f"{path}.{key}[{i}]"), "svn", int, f"{path}.{key}[{i}]") for i, c in enumerate(items))


def _obj(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{path}: must be a JSON object")
    return value


def _load(body: bytes, path: str) -> Mapping[str, Any]:
    try:
        return _obj(json.loads(body), path)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from exc


def _identity_levels(obj: Mapping[str, Any], path: str) -> tuple[IdentityTcbLevel, ...]:
    levels = []
    for i, raw in enumerate(_get(obj, "tcbLevels", list, path)):
        where = f"{path}.tcbLevels[{i}]"
        level = _obj(raw, where)
        tcb = _obj(level.get("tcb"), where + ".tcb")
        levels.append(
            IdentityTcbLevel(
                isv_svn=_get(tcb, "isvsvn", int, where + ".tcb"),
                status=_status(level, where),
                date=str(level.get("tcbDate", "")),
                advisory_ids=_advisories(level, where),
            )
        )
    return tuple(levels)


def _tdx_module(obj: Mapping[str, Any], path: str, with_levels: bool) -> TdxModuleIdentity:
    return TdxModuleIdentity(
        id=str(obj.get("id", "")),
        mr_signer=_hex(obj, "mrsigner", 48, path),
        attributes=_hex(obj, "attributes", 8, path),
        attributes_mask=_hex(obj, "attributesMask", 8, path),
        tcb_levels=_identity_levels(obj, path) if with_levels else (),
    )


def parse_tcb_info(body: bytes) -> TcbInfo:
    """Parse the inner ``tcbInfo`` JSON (v2 or v3 layout).

    Raises:
        ValueError: naming the JSON path that is missing or malformed.
    """
    info = _load(body, "tcbInfo")
    version = _get(info, "version", int, "tcbInfo")
    if version not in (2, 3):
        raise ValueError(f"tcbInfo.version: only 2 and 3 are supported, got {version}")
    levels = []
    for i, raw in enumerate(_get(info, "tcbLevels", list, "tcbInfo")):
        where = f"tcbInfo.tcbLevels[{i}]"
        level = _obj(raw, where)
        tcb = _obj(level.get("tcb"), where + ".tcb")
        if version == 2:
            sgx = tuple(_get(tcb, f"sgxtcbcomp{n:02d}svn", int, where + ".tcb") for n in range(1, 17))
            tdx: tuple[int, ...] = ()
        else:
            sgx = _svn_list(tcb, "sgxtcbcomponents", where + ".tcb")
            tdx = _svn_list(tcb, "tdxtcbcomponents", where + ".tcb") if "tdxtcbcomponents" in tcb else ()
        levels.append(
            TcbLevel(
                sgx_components=sgx,
                pce_svn=_get(tcb, "pcesvn", int, where + ".tcb"),
                tdx_components=tdx,
                status=_status(level, where),
                date=str(level.get("tcbDate", "")),
                advisory_ids=_advisories(level, where),
            )
        )
    module = info.get("tdxModule")
    identities = info.get("tdxModuleIdentities", [])
    if not isinstance(identities, list):
        raise ValueError("tcbInfo.tdxModuleIdentities: must be a list")
    return TcbInfo(
        id=str(info.get("id", "SGX")),
        version=version,
        issue_date=_date(info, "issueDate", "tcbInfo"),
        next_update=_date(info, "nextUpdate", "tcbInfo"),
        fmspc=_hex(info, "fmspc", 6, "tcbInfo"),
        pce_id=_hex(info, "pceId", 2, "tcbInfo"),
        tcb_evaluation_data_number=int(info.get("tcbEvaluationDataNumber", 0)),
        tcb_levels=tuple(levels),
        tdx_module=_tdx_module(_obj(module, "tcbInfo.tdxModule"), "tcbInfo.tdxModule", False) if module else None,
        tdx_module_identities=tuple(
            _tdx_module(_obj(m, f"tcbInfo.tdxModuleIdentities[{i}]"), f"tcbInfo.tdxModuleIdentities[{i}]", True)
            for i, m in enumerate(identities)
        ),
    )


def parse_enclave_identity(body: bytes) -> EnclaveIdentity:
    """Parse the inner ``enclaveIdentity`` JSON (QE / TD_QE identity, version 2).

    Raises:
        ValueError: naming the JSON path that is missing or malformed.
    """
    ident = _load(body, "enclaveIdentity")
    path = "enclaveIdentity"
    return EnclaveIdentity(
        id=_get(ident, "id", str, path),
        version=_get(ident, "version", int, path),
        issue_date=_date(ident, "issueDate", path),
        next_update=_date(ident, "nextUpdate", path),
        tcb_evaluation_data_number=int(ident.get("tcbEvaluationDataNumber", 0)),
        misc_select=int.from_bytes(_hex(ident, "miscselect", 4, path), "big"),
        misc_select_mask=int.from_bytes(_hex(ident, "miscselectMask", 4, path), "big"),
        attributes=_hex(ident, "attributes", 16, path),
        attributes_mask=_hex(ident, "attributesMask", 16, path),
        mr_signer=_hex(ident, "mrsigner", 32, path),
        isv_prod_id=_get(ident, "isvprodid", int, path),
        tcb_levels=_identity_levels(ident, path),
    )


# -- evaluation -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TcbEvaluation:
    """The converged TCB status of a quote and where it came from."""

    status: str
    advisory_ids: tuple[str, ...]
    platform_status: str
    qe_status: str
    tdx_module_status: str | None
    tcb_date: str


def _masked(value: bytes, mask: bytes) -> bytes:
    return bytes(v & m for v, m in zip(value, mask, strict=True))


def _first_identity_level(levels: Sequence[IdentityTcbLevel], isv_svn: int, field: str) -> IdentityTcbLevel:
    for level in levels:
        if isv_svn >= level.isv_svn:
            return level
    lowest = min((level.isv_svn for level in levels), default=0)
    raise VerificationError(field, f"isvsvn >= {lowest}", isv_svn, "TCB not supported")


def match_qe_identity(qe_report: SgxReportBody, identity: EnclaveIdentity) -> IdentityTcbLevel:
    """Check the QE report against Intel's QE identity; return its TCB level.

    Raises:
        VerificationError: mr_signer, isv_prod_id, misc_select or attributes differ
            (after masks), or the QE's ISVSVN is below every level.
    """
    if qe_report.mr_signer != identity.mr_signer:
        raise VerificationError("qe_report.mr_signer", identity.mr_signer.hex(), qe_report.mr_signer.hex())
    if qe_report.isv_prod_id != identity.isv_prod_id:
        raise VerificationError("qe_report.isv_prod_id", identity.isv_prod_id, qe_report.isv_prod_id)
    mask = identity.misc_select_mask
    if qe_report.misc_select & mask != identity.misc_select & mask:
        expected = f"{identity.misc_select:#x} under mask {mask:#x}"
        raise VerificationError("qe_report.misc_select", expected, f"{qe_report.misc_select:#x}")
    attributes = qe_report.attributes.to_bytes()
    if _masked(attributes, identity.attributes_mask) != _masked(identity.attributes, identity.attributes_mask):
        raise VerificationError(
            "qe_report.attributes",
            f"{identity.attributes.hex()} under mask {identity.attributes_mask.hex()}",
            attributes.hex(),
        )
    return _first_identity_level(identity.tcb_levels, qe_report.isv_svn, "qe_report.isv_svn")


def _converge(platform: str, other: str) -> str:
    """Combine a platform status with a QE or TDX-module status (QVL convergeTcbStatus*)."""
    if other == "OutOfDate":
        if platform in ("UpToDate", "SWHardeningNeeded"):
            return "OutOfDate"
        if platform in ("ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded"):
            return "OutOfDateConfigurationNeeded"
    if other == "Revoked":
        return "Revoked"
    return platform


def _tdx_meets(tee_tcb_svn: bytes, level: TcbLevel) -> bool:
    if len(level.tdx_components) != 16:
        raise VerificationError("tcb_info.tcbLevels.tdxtcbcomponents", "16 components", len(level.tdx_components))
    start = 2 if tee_tcb_svn[1] > 0 else 0
    return all(tee_tcb_svn[i] >= level.tdx_components[i] for i in range(start, 16))


def _tdx_module_status(tcb_info: TcbInfo, body: TdReportBody) -> tuple[str, tuple[str, ...]]:
    version, isv_svn = body.tee_tcb_svn[1], body.tee_tcb_svn[0]
    if version == 0:
        module = tcb_info.tdx_module
        if module is None:
            raise VerificationError("tcb_info.tdxModule", "present for a TDX quote", "absent")
        levels: tuple[IdentityTcbLevel, ...] = ()
    else:
        wanted = f"TDX_{version:02X}"
        found = [m for m in tcb_info.tdx_module_identities if m.id.upper() == wanted]
        if not found:
            raise VerificationError("tcb_info.tdxModuleIdentities", wanted, "absent", "no identity for this TDX module")
        module, levels = found[0], found[0].tcb_levels
    if body.mr_signer_seam != module.mr_signer:
        raise VerificationError("body.mr_signer_seam", module.mr_signer.hex(), body.mr_signer_seam.hex())
    if _masked(body.seam_attributes, module.attributes_mask) != _masked(module.attributes, module.attributes_mask):
        raise VerificationError("body.seam_attributes", module.attributes.hex(), body.seam_attributes.hex())
    if version == 0:
        return "UpToDate", ()
    level = _first_identity_level(levels, isv_svn, "body.tee_tcb_svn")
    return level.status, level.advisory_ids


def evaluate_tcb(
    pck: PckExtension, tcb_info: TcbInfo, qe_level: IdentityTcbLevel, body: SgxReportBody | TdReportBody
) -> TcbEvaluation:
    """Compute the quote's TCB status and advisory ids from its PCK TCB and the collateral.

    Raises:
        VerificationError: FMSPC/PCE-ID mismatch, TCB info of the wrong kind, or no
            TCB level matches (Intel: "TCB not supported").
    """
    if pck.fmspc != tcb_info.fmspc:
        raise VerificationError(
            "tcb_info.fmspc", pck.fmspc.hex(), tcb_info.fmspc.hex(), "TCB info is for another platform"
        )
    if pck.pce_id != tcb_info.pce_id:
        raise VerificationError("tcb_info.pceId", pck.pce_id.hex(), tcb_info.pce_id.hex())
    is_tdx = isinstance(body, TdReportBody)
    if is_tdx != (tcb_info.id == "TDX"):
        raise VerificationError("tcb_info.id", "TDX" if is_tdx else "SGX", tcb_info.id, "TCB info for the wrong TEE")
    sgx_level = tdx_level = None
    for level in tcb_info.tcb_levels:
        meets = all(p >= t for p, t in zip(pck.tcb_components, level.sgx_components, strict=True))
        if not meets or pck.pce_svn < level.pce_svn:
            continue
        if not isinstance(body, TdReportBody):
            sgx_level = level
            break
        sgx_level = sgx_level or level
        if _tdx_meets(body.tee_tcb_svn, level):
            tdx_level = level
            break
    if sgx_level is None or (is_tdx and tdx_level is None):
        raise VerificationError(
            "tcb_info.tcbLevels",
            "a level the platform meets",
            f"components {list(pck.tcb_components)} pcesvn {pck.pce_svn}",
            "TCB not supported by this TCB info",
        )
    platform = tdx_level or sgx_level
    status, module_status, advisories = platform.status, None, list(platform.advisory_ids)
    if isinstance(body, TdReportBody):
        module_status, module_advisories = _tdx_module_status(tcb_info, body)
        status = _converge(status, module_status)
        advisories += module_advisories
    status = _converge(status, qe_level.status)
    advisories += qe_level.advisory_ids
    return TcbEvaluation(
        status=status,
        advisory_ids=tuple(dict.fromkeys(advisories)),
        platform_status=platform.status,
        qe_status=qe_level.status,
        tdx_module_status=module_status,
        tcb_date=platform.date,
    )
