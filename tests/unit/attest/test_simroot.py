"""The simulated root: creation, file modes, loading and its errors."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enclavefl.attest.simroot import ROOT_COMMON_NAME, SIM_ROOT_FILES, SimRoot, init_sim_root
from enclavefl.errors import ConfigError


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("simroot") / "root"
    init_sim_root(directory, name="test-org")
    return directory


def test_creates_chain_with_not_a_real_tee_names(sim_dir: Path) -> None:
    root = SimRoot.load(sim_dir)
    cn = root.root_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == ROOT_COMMON_NAME
    for cert in root.pck_chain:
        assert "NOT A REAL TEE" in str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
        assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "test-org"
    root.pck_leaf_cert.verify_directly_issued_by(root.pck_ca_cert)
    root.pck_ca_cert.verify_directly_issued_by(root.root_cert)
    assert isinstance(root.attestation_key.curve, ec.SECP256R1)


def test_private_keys_are_0600_and_ca_keys_are_not_kept(sim_dir: Path) -> None:
    names = sorted(p.name for p in sim_dir.iterdir())
    assert names == sorted(SIM_ROOT_FILES)
    for name in SIM_ROOT_FILES:
        mode = stat.S_IMODE((sim_dir / name).stat().st_mode)
        assert mode == (0o600 if name.endswith(".key") else 0o644), name


def test_root_fingerprint_is_sha256_of_root_der(sim_dir: Path) -> None:
    root = SimRoot.load(sim_dir)
    cert = x509.load_pem_x509_certificate((sim_dir / "root_ca.pem").read_bytes())
    expected = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert root.root_fingerprint == expected
    assert "PRIVATE" not in repr(root)


def test_refuses_to_overwrite(sim_dir: Path) -> None:
    before = (sim_dir / "attestation.key").read_bytes()
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        init_sim_root(sim_dir, name="again")
    assert (sim_dir / "attestation.key").read_bytes() == before


def test_load_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="root_ca.pem: missing"):
        SimRoot.load(tmp_path)


def test_load_refuses_a_key_that_is_not_p256(tmp_path: Path, sim_dir: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in SIM_ROOT_FILES:
        (copy / name).write_bytes((sim_dir / name).read_bytes())
    p384 = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (copy / "attestation.key").write_bytes(p384)
    with pytest.raises(ConfigError, match=r"attestation.key: expected an EC P-256 private key, got EC secp384r1"):
        SimRoot.load(copy)


def test_load_refuses_a_chain_from_another_root(tmp_path: Path, sim_dir: Path) -> None:
    other = tmp_path / "other"
    init_sim_root(other, name="other-org")
    (other / "pck_ca.pem").write_bytes((sim_dir / "pck_ca.pem").read_bytes())
    with pytest.raises(ConfigError, match="pck_ca.pem: not issued by the expected CA"):
        SimRoot.load(other)


def test_load_refuses_garbage_pem(tmp_path: Path, sim_dir: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in SIM_ROOT_FILES:
        (copy / name).write_bytes((sim_dir / name).read_bytes())
    (copy / "pck_leaf.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match="pck_leaf.pem: not a PEM certificate"):
        SimRoot.load(copy)
