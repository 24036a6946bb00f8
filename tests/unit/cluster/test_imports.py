"""The Store interface and the memory store load without redis, cryptography, grpc or torch."""

from __future__ import annotations

import subprocess
import sys


def test_store_and_memory_store_import_without_redis_cryptography_grpc_or_torch() -> None:
    code = (
        "import sys\n"
        "import enclavefl.cluster, enclavefl.cluster.store, enclavefl.cluster.memory, enclavefl.cluster.redis_store\n"
        "bad = ('redis', 'cryptography', 'grpc', 'torch')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in bad))\n"
    )

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)

    assert result.stdout.strip() == "[]"


def test_sealing_names_load_on_first_use() -> None:
    from enclavefl import cluster
    from enclavefl.cluster import sealing

    assert (cluster.SealedStore, cluster.Sealer, cluster.CLUSTER_KEY_BYTES) == (
        sealing.SealedStore, sealing.Sealer, sealing.CLUSTER_KEY_BYTES)
