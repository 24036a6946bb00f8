"""Policy files (dynamic_config.json superset) and their evaluation."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from enclavefl.attest.measurement import measure_code
from enclavefl.attest.pck import INTEL_SGX_ROOT_CA_SHA256
from enclavefl.attest.policy import Policy, load_policy, parse_policy
from enclavefl.attest.providers import SimulatedProvider
from enclavefl.attest.simroot import SimRoot, init_sim_root
from enclavefl.attest.verifier import QuoteVerification, verify_quote
from enclavefl.errors import ConfigError, VerificationError

OTHER = "ab" * 32


@pytest.fixture(scope="module")
def sim_root(tmp_path_factory: pytest.TempPathFactory) -> SimRoot:
    return init_sim_root(tmp_path_factory.mktemp("policy") / "root", name="policy-tests")


@pytest.fixture(scope="module")
def verified(sim_root: SimRoot) -> QuoteVerification:
    """A real verification of a simulated quote: isv_prod_id 3, isv_svn 7."""
    provider = SimulatedProvider(sim_root, measure_code(), isv_prod_id=3, isv_svn=7)
    quote = provider.quote(bytes(64))
    return verify_quote(quote, at=dt.datetime.now(dt.timezone.utc), trusted_roots=[sim_root.root_cert])


def _reference(v: QuoteVerification, **switches: Any) -> dict[str, Any]:
    """A dynamic_config.json as the reference writes it: strings everywhere."""
    config: dict[str, Any] = {
        "verify_mr_enclave": "on",
        "verify_mr_signer": "on",
        "verify_isv_prod_id": "on",
        "verify_isv_svn": "on",
        "sgx_mrs": [
            {"mr_enclave": OTHER, "mr_signer": OTHER, "isv_prod_id": "0", "isv_svn": "0"},
            {
                "mr_enclave": v.mr_enclave.hex(),
                "mr_signer": v.mr_signer.hex(),
                "isv_prod_id": str(v.isv_prod_id),
                "isv_svn": str(v.isv_svn),
            },
        ],
    }
    config.update(switches)
    return config


def _sim(policy: dict[str, Any], sim_root: SimRoot) -> dict[str, Any]:
    return {**policy, "allow_simulated": True, "simulated_root_sha256": sim_root.root_fingerprint}


def _as_intel(v: QuoteVerification, **changes: Any) -> QuoteVerification:
    """The same facts as if the chain had ended at Intel's root (for non-simulated rules)."""
    return dataclasses.replace(v, root_fingerprint=INTEL_SGX_ROOT_CA_SHA256, **changes)


def test_reference_dynamic_config_file_loads_verbatim(tmp_path: Path, verified: QuoteVerification, sim_root: SimRoot) -> None:
    path = tmp_path / "dynamic_config.json"
    path.write_text(json.dumps(_sim(_reference(verified), sim_root)))
    policy = load_policy(path)
    assert policy.sgx_mrs[1].isv_prod_id == 3  # "3" is parsed as 3, not 0 as the C reference does
    policy.evaluate(verified, simulated=True)


def test_numbers_and_strings_mean_the_same(verified: QuoteVerification, sim_root: SimRoot) -> None:
    as_strings = parse_policy(_sim(_reference(verified), sim_root))
    numbers = _reference(verified, verify_isv_svn=True, verify_mr_signer=1)
    numbers["sgx_mrs"] = [{**e, "isv_prod_id": int(e["isv_prod_id"]), "isv_svn": int(e["isv_svn"])} for e in numbers["sgx_mrs"]]
    as_numbers = parse_policy(_sim(numbers, sim_root))
    assert as_strings == as_numbers


def test_yaml_policy_file(tmp_path: Path, verified: QuoteVerification, sim_root: SimRoot) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "verify_mr_enclave: 'on'\nverify_mr_signer: 'off'\nverify_isv_prod_id: 'off'\nverify_isv_svn: 'off'\n"
        f"sgx_mrs:\n  - mr_enclave: {verified.mr_enclave.hex()}\n"
        f"allow_simulated: true\nsimulated_root_sha256: {sim_root.root_fingerprint}\n"
    )
    load_policy(path).evaluate(verified, simulated=True)


def test_mismatch_names_field_expected_and_actual(verified: QuoteVerification, sim_root: SimRoot) -> None:
    config = _sim(_reference(verified), sim_root)
    config["sgx_mrs"] = config["sgx_mrs"][:1]
    with pytest.raises(VerificationError) as info:
        parse_policy(config).evaluate(verified, simulated=True)
    assert info.value.field == "mr_enclave"
    assert info.value.expected == f"one of [{OTHER}]"
    assert info.value.actual == verified.mr_enclave.hex()


def test_switched_off_fields_are_not_compared(verified: QuoteVerification, sim_root: SimRoot) -> None:
    config = _sim(_reference(verified, verify_mr_enclave="off", verify_isv_svn="off"), sim_root)
    config["sgx_mrs"][1]["mr_enclave"] = OTHER
    config["sgx_mrs"][1]["isv_svn"] = "99"
    parse_policy(config).evaluate(verified, simulated=True)
    config["verify_isv_svn"] = "on"
    with pytest.raises(VerificationError) as info:
        parse_policy(config).evaluate(verified, simulated=True)
    assert (info.value.field, info.value.actual) == ("isv_svn", 7)


def test_all_switches_off_accepts_any_enclave(verified: QuoteVerification, sim_root: SimRoot) -> None:
    off = {f"verify_{n}": "off" for n in ("mr_enclave", "mr_signer", "isv_prod_id", "isv_svn")}
    parse_policy(_sim({**off, "sgx_mrs": []}, sim_root)).evaluate(verified, simulated=True)


def test_one_entry_must_match_every_enabled_field(verified: QuoteVerification, sim_root: SimRoot) -> None:
    good = _reference(verified)["sgx_mrs"][1]
    split = [{**good, "isv_svn": "0"}, {**good, "mr_enclave": OTHER}]  # each entry right on some fields only
    config = _sim({**_reference(verified), "sgx_mrs": split}, sim_root)
    with pytest.raises(VerificationError) as info:
        parse_policy(config).evaluate(verified, simulated=True)
    assert info.value.field == "sgx_mrs"
    assert info.value.actual == {
        "mr_enclave": verified.mr_enclave.hex(), "mr_signer": verified.mr_signer.hex(), "isv_prod_id": 3, "isv_svn": 7
    }


def test_min_isv_svn(verified: QuoteVerification, sim_root: SimRoot) -> None:
    config = _sim(_reference(verified), sim_root)
    parse_policy({**config, "min_isv_svn": 7}).evaluate(verified, simulated=True)
    with pytest.raises(VerificationError, match=r"isv_svn: expected >= 8"):
        parse_policy({**config, "min_isv_svn": "8"}).evaluate(verified, simulated=True)


def test_debug_refused_unless_allowed(verified: QuoteVerification, sim_root: SimRoot) -> None:
    debug = dataclasses.replace(verified, debug=True)
    config = _sim(_reference(verified), sim_root)
    with pytest.raises(VerificationError) as info:
        parse_policy(config).evaluate(debug, simulated=True)
    assert info.value.field == "debug"
    parse_policy({**config, "allow_debug": True}).evaluate(debug, simulated=True)


def test_simulated_refused_unless_allowed(verified: QuoteVerification) -> None:
    with pytest.raises(VerificationError) as info:
        parse_policy(_reference(verified)).evaluate(verified, simulated=True)
    assert info.value.field == "simulated"
    assert "NOT A REAL TEE" in str(info.value)


def test_simulated_refused_from_another_sim_root(verified: QuoteVerification, sim_root: SimRoot) -> None:
    config = {**_reference(verified), "allow_simulated": True, "simulated_root_sha256": OTHER}
    with pytest.raises(VerificationError) as info:
        parse_policy(config).evaluate(verified, simulated=True)
    assert (info.value.field, info.value.expected, info.value.actual) == (
        "simulated_root_sha256", OTHER, sim_root.root_fingerprint
    )


def test_allow_simulated_needs_a_fingerprint() -> None:
    with pytest.raises(ConfigError, match="allow_simulated needs simulated_root_sha256"):
        parse_policy({"allow_simulated": True})


def test_real_evidence_needs_a_known_root(verified: QuoteVerification) -> None:
    policy = parse_policy({**_reference(verified), "allow_missing_collateral": True})
    with pytest.raises(VerificationError) as info:
        policy.evaluate(verified, simulated=False)  # the sim root is not Intel's
    assert info.value.field == "root_sha256"
    trusted = parse_policy({**policy.model_dump(), "trusted_root_sha256": verified.root_fingerprint})
    trusted.evaluate(verified, simulated=False)


def test_tcb_without_collateral_is_refused_by_default(verified: QuoteVerification) -> None:
    real = _as_intel(verified)
    with pytest.raises(VerificationError) as info:
        parse_policy(_reference(verified)).evaluate(real, simulated=False)
    assert (info.value.field, info.value.actual) == ("tcb_status", "NotEvaluated (no collateral)")
    parse_policy({**_reference(verified), "allow_missing_collateral": True}).evaluate(real, simulated=False)


def test_outdated_tcb_refused_unless_allowed(verified: QuoteVerification) -> None:
    outdated = _as_intel(verified, tcb_status="OutOfDate", advisory_ids=("INTEL-SA-00615",))
    with pytest.raises(VerificationError) as info:
        parse_policy(_reference(verified)).evaluate(outdated, simulated=False)
    assert (info.value.field, info.value.actual) == ("tcb_status", "OutOfDate")
    parse_policy({**_reference(verified), "allow_outdated_tcb": True}).evaluate(outdated, simulated=False)


def test_accepted_status_still_needs_its_advisories_accepted(verified: QuoteVerification) -> None:
    hardening = _as_intel(verified, tcb_status="SWHardeningNeeded", advisory_ids=("INTEL-SA-00289", "INTEL-SA-00615"))
    config = {**_reference(verified), "accepted_tcb_statuses": ["UpToDate", "SWHardeningNeeded"]}
    with pytest.raises(VerificationError) as info:
        parse_policy({**config, "accepted_advisories": ["INTEL-SA-00289"]}).evaluate(hardening, simulated=False)
    assert (info.value.field, info.value.actual) == ("advisory_ids", ["INTEL-SA-00615"])
    parse_policy({**config, "accepted_advisories": ["INTEL-SA-00289", "INTEL-SA-00615"]}).evaluate(
        hardening, simulated=False
    )


def test_revoked_is_never_accepted(verified: QuoteVerification) -> None:
    revoked = _as_intel(verified, tcb_status="Revoked")
    with pytest.raises(VerificationError, match="tcb_status"):
        parse_policy({**_reference(verified), "allow_outdated_tcb": True}).evaluate(revoked, simulated=False)
    with pytest.raises(ConfigError, match="may not contain"):
        parse_policy({"accepted_tcb_statuses": ["Revoked"]})


def test_tdx_is_checked_against_mr_td(verified: QuoteVerification) -> None:
    mr_td = bytes(range(48))
    td = _as_intel(verified, tee="tdx", mr_enclave=mr_td, mr_signer=b"", isv_prod_id=0, isv_svn=0)
    base = {**_reference(verified), "allow_missing_collateral": True}
    with pytest.raises(VerificationError) as info:
        parse_policy(base).evaluate(td, simulated=False)
    assert (info.value.field, info.value.expected, info.value.actual) == ("mr_td", "one of []", mr_td.hex())
    parse_policy({**base, "mr_td": [mr_td.hex().upper()]}).evaluate(td, simulated=False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"verify_mr_enclave": "yes"}, 'verify_mr_enclave = \'yes\': expected "on", "off"'),
        ({"sgx_mrs": [{"mr_enclave": "zz" * 32, "mr_signer": OTHER, "isv_prod_id": 0, "isv_svn": 0}]},
         "sgx_mrs.0.mr_enclave = 'zzzz"),
        ({"sgx_mrs": [{"mr_enclave": OTHER, "mr_signer": OTHER, "isv_prod_id": "3x", "isv_svn": 0}]},
         "sgx_mrs.0.isv_prod_id = '3x': expected a number 0..65535"),
        ({"sgx_mrs": [{"mr_enclave": OTHER, "mr_signer": OTHER, "isv_prod_id": 70000, "isv_svn": 0}]},
         "sgx_mrs.0.isv_prod_id = 70000"),
        ({"sgx_mrs": [{"mr_enclave": OTHER, "isv_prod_id": 0, "isv_svn": 0}]},
         "sgx_mrs[0] has no mr_signer but verify_mr_signer is on"),
        ({"allow_debugg": True}, "allow_debugg = True: Extra inputs are not permitted"),
        ({"accepted_tcb_statuses": ["UpTodate"]}, "unknown ['UpTodate']"),
        ({"mr_td": ["ab" * 32]}, "mr_td.0 = "),
    ],
)
def test_bad_values_name_file_key_and_value(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"sgx_mrs": [], **change}))
    with pytest.raises(ConfigError) as info:
        load_policy(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_unreadable_or_unknown_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read policy file"):
        load_policy(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_policy(bad)
    with pytest.raises(ConfigError, match=r"ends in \.json, \.yaml or \.yml"):
        load_policy(tmp_path / "policy.toml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="a policy is a mapping"):
        load_policy(listing)


def test_default_policy_is_strict() -> None:
    policy = Policy()
    assert (policy.allow_debug, policy.allow_simulated, policy.allow_outdated_tcb) == (False, False, False)
    assert policy.accepted_tcb_statuses == ("UpToDate",)
    assert policy.trusted_root_fingerprints() == {INTEL_SGX_ROOT_CA_SHA256}
