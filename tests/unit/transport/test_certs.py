from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509

from enclavefl.errors import ConfigError
from enclavefl.transport.certs import CA_KEY_FILE, add_worker_cert, create_job_certs


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _check_signed_by(cert_path: Path, ca_path: Path) -> None:
    """Raises (InvalidSignature, ValueError) unless the CA signed the certificate."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_path.read_bytes()))


def test_the_ca_key_is_kept_private_in_its_own_directory(tmp_path: Path) -> None:
    create_job_certs(tmp_path / "certs", "job", workers=1, ca_dir=tmp_path / "certs-ca")

    assert _mode(tmp_path / "certs-ca") == 0o700
    assert _mode(tmp_path / "certs-ca" / CA_KEY_FILE) == 0o600
    assert not list((tmp_path / "certs").glob("ca.key"))
    assert (tmp_path / "certs-ca" / "ca.pem").read_bytes() == (tmp_path / "certs" / "ca.pem").read_bytes()


def test_without_a_ca_dir_no_ca_key_is_written(tmp_path: Path) -> None:
    create_job_certs(tmp_path / "certs", "job", workers=1)

    assert not list(tmp_path.rglob("*ca.key"))


def test_a_ca_dir_inside_the_certificates_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is inside .*keep the CA key apart"):
        create_job_certs(tmp_path / "certs", "job", workers=1, ca_dir=tmp_path / "certs" / "ca")


def test_add_worker_issues_a_certificate_the_job_ca_signed(tmp_path: Path) -> None:
    create_job_certs(tmp_path / "certs", "job", workers=2, ca_dir=tmp_path / "ca")

    path = add_worker_cert(tmp_path / "ca", tmp_path / "certs", 2)

    assert path == tmp_path / "certs" / "worker-2.pem"
    _check_signed_by(path, tmp_path / "certs" / "ca.pem")
    assert _mode(tmp_path / "certs" / "worker-2.key") == 0o600
    assert x509.load_pem_x509_certificate(path.read_bytes()).subject.rfc4514_string().startswith("CN=enclavefl worker-2")


def test_add_worker_refuses_to_overwrite_a_certificate(tmp_path: Path) -> None:
    create_job_certs(tmp_path / "certs", "job", workers=2, ca_dir=tmp_path / "ca")

    with pytest.raises(ConfigError, match="already holds worker-1.pem"):
        add_worker_cert(tmp_path / "ca", tmp_path / "certs", 1)


def test_add_worker_refuses_a_key_that_is_not_the_cas(tmp_path: Path) -> None:
    create_job_certs(tmp_path / "certs", "job", workers=1, ca_dir=tmp_path / "ca")
    create_job_certs(tmp_path / "other", "other", workers=1, ca_dir=tmp_path / "other-ca")
    (tmp_path / "ca" / CA_KEY_FILE).chmod(0o600)
    (tmp_path / "ca" / CA_KEY_FILE).write_bytes((tmp_path / "other-ca" / CA_KEY_FILE).read_bytes())

    with pytest.raises(ConfigError, match="ca.key is not the key of ca.pem"):
        add_worker_cert(tmp_path / "ca", tmp_path / "certs", 5)


def test_add_worker_without_a_ca_names_the_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no CA here"):
        add_worker_cert(tmp_path / "nothing", tmp_path / "certs", 0)
