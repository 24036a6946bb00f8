from __future__ import annotations

import subprocess
import sys


def test_tune_malloc_applies_on_linux_glibc() -> None:
    # In a fresh process, before any thread starts, as the CLI does.
    code = "from enclavefl.cli.malloc import tune_malloc; print(tune_malloc())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    expected = "True" if sys.platform.startswith("linux") else "False"
    assert out == expected
