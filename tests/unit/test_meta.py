"""Meta-tests that catch drift: exports, lone imports, and no torch in the core."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "enclavefl"

# Run in a fresh interpreter. Modules outside enclavefl.ml come first, so torch
# in sys.modules right after one of them means that module pulled torch in.
# Before each import every enclavefl module is forgotten, so each module is
# imported alone (third-party modules stay cached, which keeps this fast).
_PROBE = r"""
import importlib, json, sys, traceback, types
report = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "enclavefl" or m.startswith("enclavefl.")]:
        del sys.modules[loaded]
    entry = {"error": None, "all": None, "missing": [], "torch": False, "public": [], "reexports": []}
    try:
        module = importlib.import_module(name)
    except BaseException:
        entry["error"] = traceback.format_exc(limit=5)
    else:
        names = getattr(module, "__all__", None)
        if names is not None:
            entry["all"] = list(names)
            entry["missing"] = [n for n in names if not hasattr(module, n)]
        # Public functions and classes defined in this package or its submodules.
        entry["public"] = sorted(
            n for n, v in vars(module).items()
            if not n.startswith("_") and not isinstance(v, types.ModuleType)
            and (getattr(v, "__module__", None) or "").startswith(name)
        )
        entry["reexports"] = sorted(
            n for n, v in vars(module).items()
            if not n.startswith("_") and not isinstance(v, types.ModuleType)
            and (getattr(v, "__module__", None) or "").startswith(name + ".")
        )
    entry["torch"] = "torch" in sys.modules
    report[name] = entry
print(json.dumps(report))
"""


def module_names() -> list[str]:
    names = []
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts[-1] == "__main__":
            continue  # running it is the CLI, not an import
        names.append(".".join(parts))
    return names


def is_ml(name: str) -> bool:
    return name == "enclavefl.ml" or name.startswith("enclavefl.ml.")


MODULES = sorted(module_names(), key=lambda n: (is_ml(n), n))
PACKAGES = sorted(
    ".".join(p.parent.relative_to(SRC.parent).parts) for p in SRC.rglob("__init__.py")
)
CORE = ["enclavefl.tensors", "enclavefl.server", "enclavefl.transport", "enclavefl.config", "enclavefl.worker"]


def run_python(code: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def probe() -> dict[str, dict[str, Any]]:
    report: dict[str, dict[str, Any]] = json.loads(run_python(_PROBE, json.dumps(MODULES)))
    return report


def test_modules_are_found() -> None:
    assert "enclavefl.tensors" in MODULES
    assert "enclavefl.server.ps" in MODULES
    assert "enclavefl.server" in PACKAGES


@pytest.mark.parametrize("name", MODULES)
def test_module_imports_alone(probe: dict[str, dict[str, Any]], name: str) -> None:
    assert probe[name]["error"] is None, probe[name]["error"]


@pytest.mark.parametrize("name", MODULES)
def test_every_name_in_all_exists(probe: dict[str, dict[str, Any]], name: str) -> None:
    assert probe[name]["missing"] == []


@pytest.mark.parametrize("name", [n for n in MODULES if not is_ml(n)])
def test_module_outside_ml_does_not_import_torch(probe: dict[str, dict[str, Any]], name: str) -> None:
    assert not probe[name]["torch"], f"{name} imports torch; torch belongs in enclavefl.ml"


def ruff_order(name: str) -> tuple[int, str]:
    """CONSTANTS, then Classes, then functions (isort style, as ruff RUF022 sorts)."""
    group = 0 if name.isupper() else 1 if name[:1].isupper() else 2
    return group, name


@pytest.mark.parametrize("name", PACKAGES)
def test_package_all_is_sorted_and_complete(probe: dict[str, dict[str, Any]], name: str) -> None:
    names = probe[name]["all"]
    if names is None:
        # Nothing to re-export is fine; public names without an __all__ are not.
        assert probe[name]["public"] == [], f"{name} has public names but no __all__"
        return
    assert len(names) == len(set(names)), f"{name}.__all__ repeats a name"
    assert names in (sorted(names), sorted(names, key=ruff_order)), f"{name}.__all__ is not sorted"


@pytest.mark.parametrize("name", PACKAGES)
def test_package_all_lists_every_reexported_name(probe: dict[str, dict[str, Any]], name: str) -> None:
    # A class or function imported from a submodule into __init__ is meant for users.
    names = probe[name]["all"] or []
    unlisted = sorted(set(probe[name]["reexports"]) - set(names))
    assert unlisted == [], f"{name} imports {unlisted} from its submodules but leaves them out of __all__"


def test_core_imports_without_torch() -> None:
    code = (
        "import importlib, sys\n"
        f"for name in {CORE!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )

    assert run_python(code).strip() == "[]"


def test_torch_detection_works(probe: dict[str, dict[str, Any]]) -> None:
    # The check above means something only if importing a torch module is seen.
    assert probe["enclavefl.ml.models"]["torch"]


# The server's parts (aggregators, rounds, metrics, engines, strategy) and the seam
# types load without grpc, cryptography or the attestation stack.
GRPC_FREE = [
    "enclavefl.messages",
    "enclavefl.server.aggregator",
    "enclavefl.server.robust",
    "enclavefl.server.metrics",
    "enclavefl.server.round",
    "enclavefl.server.engine",
    "enclavefl.server.strategy",
    "enclavefl.server.ps",
    "enclavefl.worker",
    "enclavefl.worker.inmemory",
    "enclavefl.app",
]


def test_server_parts_import_without_grpc_cryptography_or_attest() -> None:
    code = (
        "import importlib, sys\n"
        f"for name in {GRPC_FREE!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = ('grpc', 'cryptography', 'enclavefl.attest', 'enclavefl.transport', 'torch')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in bad or m.startswith(tuple(b + '.' for b in bad))))\n"
    )

    assert run_python(code).strip() == "[]"
