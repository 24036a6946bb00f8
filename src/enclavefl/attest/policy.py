"""Which attested peers a node trusts: the policy file and its evaluation.

The file is a superset of the ``dynamic_config.json`` of Intel's gRPC RA-TLS
reference (CCZoo ``grpc-ra-tls``): four switches ``verify_mr_enclave``,
``verify_mr_signer``, ``verify_isv_prod_id``, ``verify_isv_svn`` and a list
``sgx_mrs`` of reference values. A peer passes when ONE entry matches every
enabled field (exact comparison, as in the reference). Differences from the C
reference, on purpose: values are parsed properly (``"3"`` and ``3`` both mean
3, where the C code reads a quoted number as 0) and a malformed hex value is
an error instead of silently becoming 32 zero bytes.

Our own keys add what the reference leaves to environment variables or does
not have: debug enclaves, TCB status, simulated evidence, TDX measurements,
enclave attributes and an extra (non-Intel) root. Every key has a safe default:
debug refused, simulated evidence refused, only ``UpToDate`` TCB accepted,
PROVISION_KEY refused.

Two decisions are kept apart on purpose. ``allow_outdated_tcb`` and
``accepted_tcb_statuses`` judge a TCB status that was evaluated from Intel's
collateral, which always also checks the QE identity and PCK revocation. Real
evidence verified *without* collateral (no TCB level, no QE identity, no
revocation check) is accepted only with ``allow_missing_collateral``: a weaker
verdict, logged as a WARNING on every use and returned by :meth:`Policy.evaluate`
so the caller can audit it. Listing ``NotEvaluated`` in ``accepted_tcb_statuses``
is refused when the policy loads, so the old spelling cannot silently mean that.

The file is read from the path the job names, never from the environment.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Final

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from enclavefl.attest.pck import INTEL_SGX_ROOT_CA_SHA256
from enclavefl.attest.quote import SgxReportBody
from enclavefl.attest.tcb import TCB_STATUSES
from enclavefl.attest.verifier import QuoteVerification
from enclavefl.errors import ConfigError, VerificationError

__all__ = [
    "OUTDATED_TCB_STATUSES",
    "TCB_NOT_EVALUATED",
    "WEAKER_MISSING_COLLATERAL",
    "WEAKER_OUTDATED_TCB",
    "WEAKER_PROVISION_KEY",
    "Policy",
    "SgxMeasurement",
    "load_policy",
    "parse_policy",
]

logger = logging.getLogger(__name__)

#: Statuses that ``allow_outdated_tcb`` accepts in one go (Gramine's ``RA_TLS_ALLOW_*``).
#: ``Revoked`` is never acceptable.
OUTDATED_TCB_STATUSES: Final = frozenset(
    {
        "UpToDate",
        "SWHardeningNeeded",
        "ConfigurationNeeded",
        "ConfigurationAndSWHardeningNeeded",
        "OutOfDate",
        "OutOfDateConfigurationNeeded",
    }
)
_NEVER_ACCEPTED: Final = frozenset({"Revoked"})
#: The pseudo-status of real evidence verified without collateral: its TCB, QE
#: identity and revocation were not checked. Not a status a policy may list;
#: only ``allow_missing_collateral`` accepts such evidence.
TCB_NOT_EVALUATED: Final = "NotEvaluated"
#: Names :meth:`Policy.evaluate` returns for each allowance it had to use (a weaker verdict).
WEAKER_MISSING_COLLATERAL: Final = "missing_collateral"
WEAKER_OUTDATED_TCB: Final = "outdated_tcb"
WEAKER_PROVISION_KEY: Final = "provision_key"
# SGX ATTRIBUTES.FLAGS bits (Intel SDM; Gramine's sgx_arch.h names them the same way).
_FLAG_INIT: Final = 0x01
_FLAG_MODE64BIT: Final = 0x04
_FLAG_PROVISION_KEY: Final = 0x10
_FLAG_EINITTOKEN_KEY: Final = 0x20
_MAX_LISTED = 8  # measurements shown in an error message before "... N more"


def _switch(value: Any) -> bool:
    """Parse a reference switch: "on"/"off" (any case), true/false or 1/0."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("on", "off"):
        return value.strip().lower() == "on"
    raise ValueError('expected "on", "off", true, false, 1 or 0')


def _hex_digest(n_bytes: int) -> BeforeValidator:
    def parse(value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(f"expected a string of {2 * n_bytes} hex characters")
        text = value.strip().lower()
        if not re.fullmatch(rf"[0-9a-f]{{{2 * n_bytes}}}", text):
            raise ValueError(f"expected {2 * n_bytes} hex characters ({n_bytes} bytes)")
        return text

    return BeforeValidator(parse)


def _u16(value: Any) -> int:
    """Parse a 16-bit number given as a JSON number or a decimal string."""
    if isinstance(value, bool):
        raise ValueError("expected a number 0..65535, not a boolean")
    if isinstance(value, str):
        text = value.strip()
        if not re.fullmatch(r"[0-9]{1,5}", text):
            raise ValueError("expected a number 0..65535")
        value = int(text)
    if not isinstance(value, int) or not 0 <= value <= 0xFFFF:
        raise ValueError("expected a number 0..65535")
    return value


Switch = Annotated[bool, BeforeValidator(_switch)]
U16 = Annotated[int, BeforeValidator(_u16)]
Hex32 = Annotated[str, _hex_digest(32)]
Hex48 = Annotated[str, _hex_digest(48)]


class SgxMeasurement(BaseModel):
    """One reference entry of ``sgx_mrs``; a field may be left out if its switch is off."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mr_enclave: Hex32 | None = None
    mr_signer: Hex32 | None = None
    isv_prod_id: U16 | None = None
    isv_svn: U16 | None = None


_SGX_FIELDS: Final = ("mr_enclave", "mr_signer", "isv_prod_id", "isv_svn")


class Policy(BaseModel):
    """What evidence a node accepts from its peers.

    Build with :func:`load_policy` (a file) or :func:`parse_policy` (a mapping).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # -- the reference's dynamic_config.json, accepted as-is --------------------
    verify_mr_enclave: Switch = True
    verify_mr_signer: Switch = True
    verify_isv_prod_id: Switch = True
    verify_isv_svn: Switch = True
    sgx_mrs: tuple[SgxMeasurement, ...] = ()

    # -- ours ---------------------------------------------------------------------
    min_isv_svn: U16 | None = None
    allow_debug: bool = False
    allow_outdated_tcb: bool = False
    allow_missing_collateral: bool = False
    allow_provision_key: bool = False
    accepted_tcb_statuses: tuple[str, ...] = ("UpToDate",)
    accepted_advisories: tuple[str, ...] = ()
    allow_simulated: bool = False
    simulated_root_sha256: Hex32 | None = None
    mr_td: tuple[Hex48, ...] = ()
    trusted_root_sha256: Hex32 | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Policy:
        for name in _SGX_FIELDS:
            if getattr(self, f"verify_{name}"):
                for i, entry in enumerate(self.sgx_mrs):
                    if getattr(entry, name) is None:
                        raise ValueError(
                            f"sgx_mrs[{i}] has no {name} but verify_{name} is on"
                        )
        if self.allow_simulated and self.simulated_root_sha256 is None:
            raise ValueError("allow_simulated needs simulated_root_sha256 (the sim root's fingerprint)")
        bad = _NEVER_ACCEPTED.intersection(self.accepted_tcb_statuses)
        if bad:
            raise ValueError(f"accepted_tcb_statuses may not contain {sorted(bad)}")
        if TCB_NOT_EVALUATED in self.accepted_tcb_statuses:
            raise ValueError(
                f"accepted_tcb_statuses may not list {TCB_NOT_EVALUATED!r}: TCB statuses judge collateral that "
                "was checked; to accept real evidence verified without collateral (no TCB, QE identity or "
                "revocation check) set allow_missing_collateral: true instead (a weaker verdict, logged)"
            )
        known = TCB_STATUSES - _NEVER_ACCEPTED
        unknown = sorted(set(self.accepted_tcb_statuses) - known)
        if unknown:
            raise ValueError(f"accepted_tcb_statuses has unknown {unknown}; known: {sorted(known)}")
        return self

    # -- what the verifier needs ---------------------------------------------------
    def trusted_root_fingerprints(self) -> frozenset[str]:
        """SHA-256 (hex) of every root a PCK chain may end in under this policy."""
        roots = {INTEL_SGX_ROOT_CA_SHA256}
        if self.trusted_root_sha256 is not None:
            roots.add(self.trusted_root_sha256)
        if self.allow_simulated and self.simulated_root_sha256 is not None:
            roots.add(self.simulated_root_sha256)
        return frozenset(roots)

    def is_simulated_root(self, root_sha256: str) -> bool:
        """Whether a chain ending in this root is simulated evidence (neither Intel nor trusted)."""
        return root_sha256 not in (INTEL_SGX_ROOT_CA_SHA256, self.trusted_root_sha256)

    # -- evaluation ---------------------------------------------------------------
    def evaluate(self, v: QuoteVerification, *, simulated: bool) -> tuple[str, ...]:
        """Accept or refuse verified evidence.

        Args:
            v: the result of a successful cryptographic quote verification.
            simulated: the evidence comes from the simulated provider (not a TEE).

        Returns:
            The allowances this acceptance relied on, empty for a full verdict:
            ``missing_collateral`` (no TCB, QE identity or revocation check),
            ``outdated_tcb`` (a status outside ``accepted_tcb_statuses`` let in by
            ``allow_outdated_tcb``), ``provision_key``. Record them with the verdict.

        Raises:
            VerificationError: the first rule the evidence breaks, naming the
                field, what the policy expected and what the evidence holds.
        """
        self.check_root(v.root_fingerprint, simulated=simulated)
        if v.debug and not self.allow_debug:
            raise VerificationError("debug", "a production enclave (allow_debug is off)", "debug enclave")
        weaker = self._check_tcb(v, simulated=simulated)
        if v.tee == "tdx":
            self._check_tdx(v)
        else:
            weaker += self._check_attributes(v)
            self._check_sgx(v)
        return weaker

    def check_root(self, root_fingerprint: str, *, simulated: bool) -> None:
        """Refuse a PCK chain root this policy does not trust.

        Callable before the quote is verified, so a peer with simulated evidence
        is told so plainly rather than with a chain error.

        Raises:
            VerificationError: field ``simulated``, ``simulated_root_sha256`` or ``root_sha256``.
        """
        if simulated:
            if not self.allow_simulated:
                raise VerificationError(
                    "simulated", "real TEE evidence (allow_simulated is off)", "simulated evidence, NOT A REAL TEE"
                )
            if root_fingerprint != self.simulated_root_sha256:
                raise VerificationError(
                    "simulated_root_sha256", self.simulated_root_sha256, root_fingerprint,
                    "simulated evidence from another sim root, NOT A REAL TEE",
                )
            logger.debug("simulated root %s is allowed (NOT A REAL TEE)", root_fingerprint[:16])
            return
        allowed = [INTEL_SGX_ROOT_CA_SHA256]
        if self.trusted_root_sha256 is not None:
            allowed.append(self.trusted_root_sha256)
        if root_fingerprint not in allowed:
            raise VerificationError("root_sha256", f"one of {allowed}", root_fingerprint)

    def _check_tcb(self, v: QuoteVerification, *, simulated: bool) -> tuple[str, ...]:
        if simulated:
            return ()  # a simulated platform has no TCB to evaluate (and is flagged as simulated)
        if v.tcb_status is None:
            # Only this switch accepts it: allow_outdated_tcb judges an evaluated status.
            if not self.allow_missing_collateral:
                raise VerificationError(
                    "tcb_status", f"one of {list(self.accepted_tcb_statuses)}", f"{TCB_NOT_EVALUATED} (no collateral)",
                    "without collateral the TCB level, QE identity and PCK revocation are not checked; pass "
                    "collateral, or set allow_missing_collateral: true to accept that weaker verdict",
                )
            logger.warning(
                "accepting %s evidence mr_enclave=%s WITHOUT collateral (allow_missing_collateral): "
                "TCB level, QE identity and PCK revocation NOT checked",
                v.tee, v.mr_enclave.hex()[:16],
            )
            return (WEAKER_MISSING_COLLATERAL,)
        if v.tcb_status in _NEVER_ACCEPTED:
            raise VerificationError("tcb_status", "not Revoked", v.tcb_status)
        if v.tcb_status not in self.accepted_tcb_statuses:
            if self.allow_outdated_tcb and v.tcb_status in OUTDATED_TCB_STATUSES:
                logger.info("accepting TCB status %s (allow_outdated_tcb)", v.tcb_status)
                return (WEAKER_OUTDATED_TCB,)
            raise VerificationError("tcb_status", f"one of {list(self.accepted_tcb_statuses)}", v.tcb_status)
        unaccepted = sorted(set(v.advisory_ids) - set(self.accepted_advisories))
        if unaccepted:
            raise VerificationError("advisory_ids", f"within {list(self.accepted_advisories)}", unaccepted)
        return ()

    def _check_attributes(self, v: QuoteVerification) -> tuple[str, ...]:
        """Refuse the enclave attributes Gramine's RA-TLS verifier refuses.

        INIT and MODE64BIT must be set (an initialised 64-bit enclave); PROVISION_KEY
        and EINITTOKEN_KEY give access to keys only Intel's architectural enclaves
        need, and are refused unless ``allow_provision_key``.
        """
        body = v.quote.body
        if not isinstance(body, SgxReportBody):
            return ()
        flags = body.attributes.flags
        for bit, name in ((_FLAG_INIT, "INIT"), (_FLAG_MODE64BIT, "MODE64BIT")):
            if not flags & bit:
                raise VerificationError("attributes.flags", f"{name} ({bit:#x}) set", f"{flags:#x}")
        keys = [name for bit, name in ((_FLAG_PROVISION_KEY, "PROVISION_KEY"), (_FLAG_EINITTOKEN_KEY, "EINITTOKEN_KEY"))
                if flags & bit]
        if not keys:
            return ()
        if not self.allow_provision_key:
            raise VerificationError(
                "attributes.flags", f"{' and '.join(keys)} clear (allow_provision_key is off)", f"{flags:#x}"
            )
        logger.warning("accepting an enclave with %s set (allow_provision_key)", "+".join(keys))
        return (WEAKER_PROVISION_KEY,)

    def _check_tdx(self, v: QuoteVerification) -> None:
        actual = v.mr_enclave.hex()
        if actual not in self.mr_td:
            raise VerificationError("mr_td", f"one of {_listing(self.mr_td)}", actual)

    def _check_sgx(self, v: QuoteVerification) -> None:
        if self.min_isv_svn is not None and v.isv_svn < self.min_isv_svn:
            raise VerificationError("isv_svn", f">= {self.min_isv_svn} (min_isv_svn)", v.isv_svn)
        enabled = [name for name in _SGX_FIELDS if getattr(self, f"verify_{name}")]
        if not enabled:
            logger.warning("policy checks no enclave measurement: any enclave is accepted")
            return
        actual: dict[str, Any] = {
            "mr_enclave": v.mr_enclave.hex(),
            "mr_signer": v.mr_signer.hex(),
            "isv_prod_id": v.isv_prod_id,
            "isv_svn": v.isv_svn,
        }
        for entry in self.sgx_mrs:
            if all(getattr(entry, name) == actual[name] for name in enabled):
                return
        # Name the first field that no entry matches; if each field matches some
        # entry on its own, the combination is what is missing.
        for name in enabled:
            values = [getattr(entry, name) for entry in self.sgx_mrs]
            if actual[name] not in values:
                raise VerificationError(name, f"one of {_listing(values)}", actual[name])
        combo = {name: actual[name] for name in enabled}
        raise VerificationError("sgx_mrs", "one entry matching all enabled fields", combo)


def _listing(values: Sequence[object]) -> str:
    unique = list(dict.fromkeys(values))
    shown = ", ".join(str(value) for value in unique[:_MAX_LISTED])
    more = f", ... {len(unique) - _MAX_LISTED} more" if len(unique) > _MAX_LISTED else ""
    return f"[{shown}{more}]"


def parse_policy(data: Mapping[str, Any], *, source: str = "<policy>") -> Policy:
    """Validate a policy mapping (already decoded JSON/YAML).

    Raises:
        ConfigError: naming ``source``, the dotted key, the value and the rule.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: a policy is a mapping of keys, got {type(data).__name__}")
    try:
        return Policy.model_validate(dict(data))
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(part) for part in err["loc"]) or "(top level)"
            message = err["msg"].removeprefix("Value error, ")
            value = err.get("input")
            shown = "" if err["type"] == "missing" or not err["loc"] else f" = {value!r}"
            problems.append(f"{source}: {key}{shown}: {message}")
        raise ConfigError("; ".join(problems)) from exc


def load_policy(path: Path) -> Policy:
    """Read a policy file: ``.json`` or ``.yaml``/``.yml``.

    Raises:
        ConfigError: the file is missing, unreadable, not JSON/YAML, or invalid.
    """
    suffix = path.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise ConfigError(f"{path}: a policy file ends in .json, .yaml or .yml")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read policy file: {exc}") from exc
    try:
        data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not valid {suffix.lstrip('.').upper()}: {exc}") from exc
    if data is None:
        data = {}
    return parse_policy(data, source=str(path))
