"""The worker's secure-aggregation round against a scripted PS: refusals are audited and end the round."""

from __future__ import annotations

import dataclasses

import pytest

from enclavefl.errors import ProtocolError
from enclavefl.messages import TaskInfo, TaskKind
from enclavefl.privacy.secagg.messages import KeyAdvert
from enclavefl.privacy.secagg.params import SecAggParams
from enclavefl.privacy.secagg.stages import NONCE_KEY, SecAggAnswer, SecAggCall, task_config
from enclavefl.worker.secagg import SecAggRound

NONCE = "00" * 16


class ScriptedPs:
    """A SecAggChannel whose PS answers the advertise stage with a roster whose other keys are forged."""

    def __init__(self) -> None:
        self.refusals: list[tuple[str, str]] = []
        self.calls: list[SecAggCall] = []

    def secagg_exchange(self, call: SecAggCall) -> SecAggAnswer:
        self.calls.append(call)
        assert call.advert is not None
        forged = [KeyAdvert(f"peer{i}", bytes([i + 1]) * 32, bytes([i + 9]) * 32, b"forged") for i in range(2)]
        return SecAggAnswer("ready", roster=(call.advert, *forged),
                            certificates={call.worker_id: b"mine", "peer0": b"c0", "peer1": b"c1"})

    def sign_for_secagg(self, payload: bytes) -> tuple[bytes, bytes]:
        return b"mine", b"signed:" + payload[:8]

    def verify_for_secagg(self, certificate: bytes, payload: bytes, signature: bytes) -> bool:
        return signature.startswith(b"signed:")

    def record_secagg_refusal(self, stage: str, reason: str) -> None:
        self.refusals.append((stage, reason))


def test_a_roster_with_forged_keys_is_refused_audited_and_no_share_is_sent() -> None:
    ps = ScriptedPs()
    config = {**task_config(SecAggParams(), 5.0, equal_weights=False), NONCE_KEY: NONCE}
    task = TaskInfo(TaskKind.TRAIN, "ps", round=3, config=config)
    round_ = SecAggRound(ps, "me", task, name="w0")
    with pytest.raises(ProtocolError, match="not signed by its attested key"):
        round_.keys()
    assert [stage for stage, _ in ps.refusals] == ["share"]
    assert [c.stage for c in ps.calls] == ["advertise"]  # nothing was shared


def test_a_task_without_secure_aggregation_is_refused() -> None:
    task = TaskInfo(TaskKind.TRAIN, "ps", round=1)
    with pytest.raises(ProtocolError, match="runs no secure aggregation"):
        SecAggRound(ScriptedPs(), "me", task, name="w0")


def test_a_task_with_a_short_nonce_is_refused() -> None:
    config = {**task_config(SecAggParams(), 5.0, equal_weights=False), NONCE_KEY: "abcd"}
    with pytest.raises(ProtocolError, match="must be 16 bytes"):
        SecAggRound(ScriptedPs(), "me", dataclasses.replace(TaskInfo(TaskKind.TRAIN, "ps"), config=config), name="w0")
