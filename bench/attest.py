"""Benchmark: cost of RA-TLS with simulated evidence.

Prints one line: the median milliseconds to create a node identity (EC key,
two quotes, certificate) and to verify a peer certificate (self-signature,
quote chain and signatures, binding, policy). Uses a temporary simulated root;
figures for real SGX add the Quoting Enclave's latency on the create side.

    python bench/attest.py [--runs 200]
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import statistics
import tempfile
import time
from pathlib import Path

from enclavefl.attest.measurement import measure_code
from enclavefl.attest.policy import parse_policy
from enclavefl.attest.providers import SimulatedProvider
from enclavefl.attest.ratls import create_ratls_identity, verify_ratls_certificate
from enclavefl.attest.simroot import init_sim_root


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=200, help="timed runs per measurement (default 200)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    # Every simulated verification logs a NOT-A-REAL-TEE warning; 2 x runs of them
    # would bury the figures. The output line says the evidence is simulated.
    logging.basicConfig(level=logging.ERROR)

    with tempfile.TemporaryDirectory() as tmp:
        sim_root = init_sim_root(Path(tmp) / "simroot", name="bench")
        provider = SimulatedProvider(sim_root, measure_code())
        policy = parse_policy(
            {
                "sgx_mrs": [
                    {"mr_enclave": provider.mr_enclave.hex(), "mr_signer": provider.mr_signer.hex(), "isv_prod_id": 0, "isv_svn": 0}
                ],
                "allow_simulated": True,
                "simulated_root_sha256": sim_root.root_fingerprint,
            }
        )
        validity = dt.timedelta(hours=1)
        create: list[float] = []
        identity = create_ratls_identity(provider, common_name="bench", validity=validity)  # warm-up
        for _ in range(args.runs):
            start = time.perf_counter()
            identity = create_ratls_identity(provider, common_name="bench", validity=validity)
            create.append(time.perf_counter() - start)

        at = dt.datetime.now(dt.timezone.utc)
        verify: list[float] = []
        verify_ratls_certificate(identity.cert_pem, policy=policy, at=at)  # warm-up
        for _ in range(args.runs):
            start = time.perf_counter()
            verify_ratls_certificate(identity.cert_pem, policy=policy, at=at)
            verify.append(time.perf_counter() - start)

    print(
        f"create_identity_ms={_median_ms(create):.2f} verify_peer_ms={_median_ms(verify):.2f} "
        f"cert_bytes={len(identity.cert_pem)} runs={args.runs} evidence=simulated-NOT-A-REAL-TEE"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
