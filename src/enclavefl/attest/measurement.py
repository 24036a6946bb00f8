"""Code measurement for simulated evidence, and signer identities.

A real SGX enclave's MRENCLAVE is computed by the CPU over the pages loaded
into the enclave. The simulated provider has no CPU to do that, so it
measures what decides the node's behaviour instead: the installed enclavefl
package (``*.py``, ``*.proto``, ``*.pem``), the task code the job names, and
the interpreter version. The result is SHA-256 over a canonical, sorted
listing of ``(relative path, SHA-256 of content)``; one changed line in any
measured file changes it. Absolute paths never enter the listing, so the same
code installed in two places measures the same.

MRSIGNER follows SGX for RSA keys (SHA-256 of the modulus as little-endian
bytes, the convention the CPU uses for SIGSTRUCT) so a real enclave signer key
gives its real MRSIGNER; for other keys it is SHA-256 of the DER
SubjectPublicKeyInfo.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from enclavefl.errors import ConfigError

__all__ = [
    "CodeMeasurement",
    "MEASURED_SUFFIXES",
    "measure_code",
    "signer_id",
]

logger = logging.getLogger(__name__)

#: File kinds that make up the measured code.
MEASURED_SUFFIXES: Final = frozenset({".py", ".proto", ".pem"})
_DOMAIN: Final = b"enclavefl code measurement v1\n"
_READ_BLOCK = 1 << 20

SignerPublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


@dataclass(frozen=True, slots=True)
class CodeMeasurement:
    """The simulated MRENCLAVE and how many files went into it."""

    mr_enclave: bytes
    file_count: int

    def __repr__(self) -> str:
        return f"CodeMeasurement(mr_enclave={self.mr_enclave.hex()}, file_count={self.file_count})"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as stream:
            while block := stream.read(_READ_BLOCK):
                digest.update(block)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read file to measure: {exc}") from exc
    return digest.hexdigest()


def _walk(root: Path) -> Iterator[Path]:
    """Measured files under ``root``, skipping caches and hidden directories."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if path.suffix in MEASURED_SUFFIXES:
                yield path


@functools.lru_cache(maxsize=1)
def _package_listing() -> tuple[tuple[str, str], ...]:
    """(``enclavefl/<relative path>``, sha256) of the installed package, measured once per process."""
    package_dir = Path(__file__).resolve().parents[1]
    entries = tuple(
        (f"enclavefl/{path.relative_to(package_dir).as_posix()}", _file_sha256(path))
        for path in _walk(package_dir)
    )
    logger.debug("measured %d package files", len(entries))
    return entries


def _extra_listing(extra_paths: Sequence[Path]) -> list[tuple[str, str]]:
    """Task code entries, named ``task/<name>[/<relative path>]``."""
    entries: list[tuple[str, str]] = []
    seen: dict[str, Path] = {}
    for given in extra_paths:
        path = Path(given)
        if path.is_dir():
            files = [(f"task/{path.name}/{f.relative_to(path).as_posix()}", f) for f in _walk(path)]
        elif path.is_file():
            files = [(f"task/{path.name}", path)]
        else:
            raise ConfigError(f"{path}: task code to measure does not exist")
        for name, file in files:
            if name in seen:
                raise ConfigError(
                    f"{file}: measured name {name!r} is also used by {seen[name]}; rename one of them"
                )
            seen[name] = file
            entries.append((name, _file_sha256(file)))
    return entries


def measure_code(extra_paths: Sequence[Path] = ()) -> CodeMeasurement:
    """Measure the enclavefl package, the given task code and the interpreter.

    Args:
        extra_paths: task files or directories (directories are walked for the
            measured suffixes). Each is named by its last path component.

    Returns:
        The 32-byte simulated MRENCLAVE and the number of files measured.

    Raises:
        ConfigError: an extra path is missing or unreadable, or two extra
            paths would be measured under the same name.
    """
    entries = sorted((*_package_listing(), *_extra_listing(extra_paths)))
    digest = hashlib.sha256(_DOMAIN)
    for name, file_hash in entries:
        digest.update(f"{name}\0{file_hash}\n".encode())
    digest.update(f"python\0{sys.version}\n".encode())
    return CodeMeasurement(mr_enclave=digest.digest(), file_count=len(entries))


def signer_id(public_key: SignerPublicKey) -> bytes:
    """MRSIGNER of a signer public key (32 bytes).

    RSA: SHA-256 of the modulus as little-endian bytes of the key's size, as
    SGX computes it. EC: SHA-256 of the DER SubjectPublicKeyInfo.
    """
    if isinstance(public_key, rsa.RSAPublicKey):
        size = (public_key.key_size + 7) // 8
        modulus = public_key.public_numbers().n.to_bytes(size, "little")
        return hashlib.sha256(modulus).digest()
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()
