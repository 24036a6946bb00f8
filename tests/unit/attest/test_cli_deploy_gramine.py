"""deploy/gramine: the manifest template renders to a manifest whose file lists are what the threat model needs."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

GRAMINE = Path(__file__).resolve().parents[3] / "deploy" / "gramine"
VARS = {
    "entrypoint": "/opt/fl/venv/bin/python3",
    "log_level": "error",
    "arch_libdir": "/lib/x86_64-linux-gnu",
    "venv_dir": "/opt/fl/venv",
    "job_dir": "/srv/fl/job",
    "task_dir": "/srv/fl/task",
    "data_dir": "/srv/fl/data",
    "model_dir": "/srv/fl/model",
    "ps_address": "ps.example.org:50051",
    "worker_index": "2",
    "enclave_size": "8G",
    "max_threads": "64",
    "omp_threads": "4",
    "isv_prod_id": "1",
    "isv_svn": "1",
}


class _Gramine:
    """What gramine-manifest provides to templates as ``gramine``."""

    libos = "/usr/lib/x86_64-linux-gnu/gramine/libsysdb.so"

    @staticmethod
    def runtimedir() -> str:
        return "/usr/lib/x86_64-linux-gnu/gramine/runtime/glibc"


class _Python:
    """What gramine-manifest provides to templates as ``python``."""

    stdlib = "/usr/lib/python3.11"
    distlib = "/usr/lib/python3/dist-packages"


def render(role: str) -> dict[str, Any]:
    jinja2 = pytest.importorskip("jinja2")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    text = env.from_string((GRAMINE / "enclavefl.manifest.template").read_text()).render(
        role=role, gramine=_Gramine(), python=_Python(), **VARS
    )
    return tomllib.loads(text)


@pytest.mark.parametrize("role", ["ps", "worker"])
def test_trusted_files_hold_interpreter_package_dependencies_and_task(role: str) -> None:
    manifest = render(role)
    trusted = manifest["sgx"]["trusted_files"]
    for needed in ("file:/opt/fl/venv/bin/python3", "file:/opt/fl/venv/", "file:/srv/fl/task/", "file:/srv/fl/job/",
                   "file:/usr/lib/python3.11/", f"file:{_Gramine.libos}"):
        assert needed in trusted
    assert not any(f.startswith(("file:/srv/fl/data", "file:/srv/fl/model")) for f in trusted)


@pytest.mark.parametrize("role", ["ps", "worker"])
def test_allowed_files_are_only_data_and_model_dirs(role: str) -> None:
    assert render(role)["sgx"]["allowed_files"] == ["file:/srv/fl/data/", "file:/srv/fl/model/"]


@pytest.mark.parametrize("role", ["ps", "worker"])
def test_no_host_argv_or_environment_and_dcap_attestation(role: str) -> None:
    manifest = render(role)
    loader = manifest["loader"]
    assert "insecure__use_host_env" not in loader and "insecure__use_cmdline_argv" not in loader
    assert "argv_src_file" not in loader and "env_src_file" not in loader
    assert loader["argv"][:4] == ["/opt/fl/venv/bin/python3", "-m", "enclavefl", role]
    assert manifest["sgx"]["remote_attestation"] == "dcap"
    assert manifest["sgx"]["debug"] is False
    text = (GRAMINE / "enclavefl.manifest.template").read_text()
    assert "insecure__use_host_env = true" not in text and "insecure__use_cmdline_argv = true" not in text


def test_worker_argv_is_fixed_with_its_ps_and_index() -> None:
    argv = render("worker")["loader"]["argv"]
    assert argv[argv.index("--connect") + 1] == "ps.example.org:50051"
    assert argv[argv.index("--index") + 1] == "2"
