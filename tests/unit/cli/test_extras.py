from __future__ import annotations

import pytest

from enclavefl.cli import missing_extra


@pytest.mark.parametrize(("module", "extra"), [("torch", "ml"), ("torch.nn", "ml"), ("sklearn.datasets", "ml"),
                                               ("matplotlib", "report"), ("keras", "ml,keras")])
def test_a_missing_optional_package_names_its_extra(module: str, extra: str) -> None:
    hint = missing_extra(ModuleNotFoundError(f"No module named {module!r}", name=module))

    assert hint is not None and hint.endswith(f"pip install 'enclavefl[{extra}]'")


def test_another_missing_module_is_not_an_extra() -> None:
    assert missing_extra(ModuleNotFoundError("No module named 'a3task'", name="a3task")) is None


def test_a_broken_optional_package_is_not_reported_as_missing() -> None:
    # torch present but failing to load (an ImportError that is not ModuleNotFoundError) keeps its own message.
    assert missing_extra(ImportError("libtorch_cpu.so: cannot open shared object file", name="torch")) is None
