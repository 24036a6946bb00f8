"""Code measurement (simulated MRENCLAVE) and signer identities."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

import enclavefl
from enclavefl.attest.measurement import measure_code, signer_id
from enclavefl.errors import ConfigError

SHARED = Path(__file__).resolve().parents[3] / ".." / "shared"
SIGNER_PEM = SHARED / "ra-samples" / "certs" / "cosmian_enclave_signer_rsa3072_pub.pem"

TASK = "def train(x):\n    return x + 1\n\n\ndef evaluate(x):\n    return x\n"


def _task(directory: Path, text: str = TASK) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "task.py"
    path.write_text(text)
    return path


def test_one_changed_line_in_task_code_changes_mr_enclave(tmp_path: Path) -> None:
    task = _task(tmp_path)
    before = measure_code([task])
    task.write_text(TASK.replace("x + 1", "x + 2"))
    after = measure_code([task])
    assert len(before.mr_enclave) == 32
    assert before.mr_enclave != after.mr_enclave


def test_measurement_is_stable_and_independent_of_install_location(tmp_path: Path) -> None:
    first = measure_code([_task(tmp_path / "a")])
    second = measure_code([_task(tmp_path / "elsewhere" / "b")])
    assert first == second
    assert first == measure_code([_task(tmp_path / "a")])


def test_task_code_is_part_of_the_measurement(tmp_path: Path) -> None:
    base = measure_code()
    with_task = measure_code([_task(tmp_path)])
    assert with_task.mr_enclave != base.mr_enclave
    assert with_task.file_count == base.file_count + 1


def test_package_files_are_counted() -> None:
    package_dir = Path(enclavefl.__path__[0]).resolve()
    py_files = [p for p in package_dir.rglob("*.py") if "__pycache__" not in p.parts]
    assert measure_code().file_count >= len(py_files) > 0


def test_directory_of_task_code_is_walked(tmp_path: Path) -> None:
    pkg = tmp_path / "mytask"
    _task(pkg)
    (pkg / "model.py").write_text("W = 1\n")
    (pkg / "notes.txt").write_text("not code\n")
    before = measure_code([pkg])
    (pkg / "model.py").write_text("W = 2\n")
    after = measure_code([pkg])
    assert after.file_count == measure_code().file_count + 2
    assert before.mr_enclave != after.mr_enclave


def test_missing_task_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        measure_code([tmp_path / "absent.py"])


def test_two_task_files_with_the_same_name_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="also used by"):
        measure_code([_task(tmp_path / "a"), _task(tmp_path / "b")])


def test_ec_signer_id_is_sha256_of_spki() -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert signer_id(key) == hashlib.sha256(der).digest()


def test_rsa_signer_id_matches_real_sgx_mrsigner() -> None:
    if not SIGNER_PEM.is_file():
        pytest.skip(f"shared ra-samples not found at {SIGNER_PEM}")
    key = serialization.load_pem_public_key(SIGNER_PEM.read_bytes())
    assert isinstance(key, rsa.RSAPublicKey)
    # MRSIGNER of the real Cosmian enclaves in ra-samples/certs (ratls_cosmian_sgx_2023-05.pem).
    assert signer_id(key).hex() == "c1c161d0dd996e8a9847de67ea2c00226761f7715a2c422d3012ac10795a1ef5"
