from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.cluster import Cluster


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[type[Cluster]]:
    made: list[Cluster] = []

    class _Factory(Cluster):
        @classmethod
        def create(cls, root: Path | None = None, **sections: dict) -> Cluster:  # type: ignore[override]
            c = Cluster.create(root or tmp_path / f"c{len(made)}", **sections)
            made.append(c)
            return c

    yield _Factory
    for c in made:
        c.close()
