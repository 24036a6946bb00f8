"""The worker tries a join again when the PS refused it for its nonce, a bounded number of times."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from enclavefl.errors import VerificationError
from enclavefl.messages import JoinInfo
from enclavefl.server.ps import ParameterServer
from enclavefl.tensors import ParamSet
from enclavefl.worker import InMemoryClient, Worker, WorkerSettings
from tests.unit.worker.federation import AddTrainer, job, peer

# The reasons as the gRPC client words a PS refusal (the PS's details after the call and target).
NONCE_REFUSAL = ("Join 127.0.0.1:1: join.nonce: expected a nonce this PS issued on this connection, unused and "
                 "younger than 60s, got not issued by this PS for this connection")
EVIDENCE_REFUSAL = "Join 127.0.0.1:1: mr_enclave: expected one of [aa..], got bb.."


class RefusingClient(InMemoryClient):
    """An in-process client whose first ``refusals`` joins the PS refuses with ``reason`` (as the gRPC client raises)."""

    def __init__(self, ps: ParameterServer, refusals: int, reason: str) -> None:
        super().__init__(ps, peer("w0"))
        self.refusals = refusals
        self.reason = reason
        self.joins = 0

    def join(self, worker_name: str, num_samples: int, *, job_settings: Mapping[str, str] | None = None) -> JoinInfo:
        self.joins += 1
        if self.joins <= self.refusals:
            raise VerificationError("peer", "accepted by the peer", "refused", self.reason)
        return super().join(worker_name, num_samples, job_settings=job_settings)


def run_worker(tmp_path: Path, refusals: int, reason: str) -> tuple[RefusingClient, Worker, BaseException | None]:
    ps = ParameterServer(job(rounds=1, workers=1), ParamSet([("w", np.zeros(2, np.float32))]), out_dir=tmp_path)
    client = RefusingClient(ps, refusals, reason)
    worker = Worker(lambda: client, AddTrainer(1.0, 4),
                    WorkerSettings(name="w0", poll_s=0.2, backoff_initial_s=0.01, join_attempts=3))
    failure: list[BaseException] = []

    def body() -> None:
        try:
            worker.run()
        except BaseException as exc:  # handed to the test below
            failure.append(exc)

    threads = [threading.Thread(target=ps.run, daemon=True), threading.Thread(target=body, daemon=True)]
    for t in threads:
        t.start()
    threads[1].join(20)
    ps.stop()
    threads[0].join(20)
    assert not any(t.is_alive() for t in threads)
    return client, worker, failure[0] if failure else None


def test_a_join_refused_for_its_nonce_is_tried_again_and_each_retry_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="enclavefl.worker.runtime")

    client, worker, failure = run_worker(tmp_path, refusals=2, reason=NONCE_REFUSAL)

    assert failure is None and worker.rounds_done == 1
    assert client.joins == 3
    retries = [r.getMessage() for r in caplog.records if "join refused" in r.getMessage()]
    assert len(retries) == 2 and "attempt 1 of 3" in retries[0] and "attempt 2 of 3" in retries[1]


def test_the_worker_gives_up_after_join_attempts_refusals(tmp_path: Path) -> None:
    client, worker, failure = run_worker(tmp_path, refusals=10, reason=NONCE_REFUSAL)

    assert isinstance(failure, VerificationError) and "join.nonce" in str(failure)
    assert client.joins == 3 and worker.rounds_done == 0


def test_a_refusal_of_the_evidence_is_not_tried_again(tmp_path: Path) -> None:
    client, _, failure = run_worker(tmp_path, refusals=10, reason=EVIDENCE_REFUSAL)

    assert isinstance(failure, VerificationError) and "mr_enclave" in str(failure)
    assert client.joins == 1
