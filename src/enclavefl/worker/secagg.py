"""The worker's side of a secure-aggregation round: key stages, masking the update, unmasking.

How this works: a train task whose config map carries ``secagg.nonce`` runs
secure aggregation (:mod:`enclavefl.privacy.secagg.stages`; the PS is the only
source of its settings). Before local training, :meth:`SecAggRound.keys` posts
this worker's signed keys and its sealed shares and receives the roster and the
shares meant for it; after training, :meth:`SecAggRound.mask` turns the update
into the one masked uint32 tensor that is pushed (kind ``masked``), and once
the PS accepted it :meth:`SecAggRound.unmask` answers the PS's one unmask
request. Every refusal of :class:`~enclavefl.privacy.secagg.client.SecAggClient`
(a forged or replayed message, a question that would reveal an input) ends this
worker's part in the round with a ProtocolError, which the caller logs.

TEST HOOK: if the environment variable :data:`CRASH_AFTER_SHARE_ENV` names this
worker (``name:round``, comma-separated), the process kills itself with SIGKILL
right after its shares were accepted, so tests can drop workers at exactly that
point. With :data:`CRASH_ONCE_DIR_ENV` set too, it does so once per worker and
round (a marker file in that directory), so a restarted worker takes part in the
retry. It can only end the process, which the host can do anyway: no trust is
taken from the environment.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from collections.abc import Callable
from typing import TypeVar, final

import numpy as np

from enclavefl.errors import ProtocolError, RoundError
from enclavefl.messages import TaskInfo, UpdateKind
from enclavefl.privacy.secagg.client import SecAggClient
from enclavefl.privacy.secagg.messages import KeyAdvert, Roster, ShareCiphertext
from enclavefl.privacy.secagg.stages import (
    MASKED_TENSOR,
    SecAggAnswer,
    SecAggCall,
    SecAggChannel,
    Stage,
    flatten_update,
    params_from_task,
    tag_from_task,
)
from enclavefl.tensors import ParamSet, StreamHeader

__all__ = ["CRASH_AFTER_SHARE_ENV", "CRASH_ONCE_DIR_ENV", "SecAggRound"]

log = logging.getLogger(__name__)

T = TypeVar("T")

CRASH_AFTER_SHARE_ENV = "ENCLAVEFL_TEST_SECAGG_CRASH_AFTER_SHARE"
"""TEST ONLY: ``worker-7:1,worker-8:1`` makes those workers SIGKILL themselves after their round-1 shares."""
CRASH_ONCE_DIR_ENV = "ENCLAVEFL_TEST_SECAGG_CRASH_ONCE_DIR"
"""TEST ONLY: a directory of marker files, so each ``name:round`` crash happens once."""

POLL_S = 5.0
"""One stage call waits at most this long before it asks again."""

READY_LIMIT_S = 3600.0
"""The longest a worker waits for the unmask request (the PS ends every attempt well before)."""


def _crash_requested(name: str, round_: int) -> bool:
    wanted = os.environ.get(CRASH_AFTER_SHARE_ENV, "")
    if f"{name}:{round_}" not in {item.strip() for item in wanted.split(",")}:
        return False
    once = os.environ.get(CRASH_ONCE_DIR_ENV)
    if not once:
        return True
    try:
        (Path(once) / f"{name}-{round_}").touch(exist_ok=False)
    except FileExistsError:
        return False
    return True


@final
class SecAggRound:
    """One worker's part in one secure-aggregation round attempt.

    Raises (from its methods):
        ProtocolError: the PS or a peer sent something this worker refuses.
        RoundError: the PS ended the attempt (too few workers, a failed stage).
    """

    def __init__(self, channel: SecAggChannel, worker_id: str, task: TaskInfo, *, name: str,
                 stop: threading.Event | None = None) -> None:
        found = params_from_task(task.config)
        if found is None:
            raise ProtocolError(f"round {task.round}: the train task runs no secure aggregation")
        self._params, self._timeout_s = found
        self._channel = channel
        self._worker_id = worker_id
        self._name = name
        self._tag = tag_from_task(task.round, task.config)
        self._stop = stop or threading.Event()
        self._certificates: dict[str, bytes] = {}
        self._own_certificate = b""
        self._client = SecAggClient(worker_id, self._tag, self._params, self._sign, self._verify)
        self._inbox: tuple[ShareCiphertext, ...] = ()

    def _sign(self, payload: bytes) -> bytes:
        certificate, signature = self._channel.sign_for_secagg(payload)
        self._own_certificate = certificate
        return signature

    def _verify(self, sender: str, payload: bytes, signature: bytes) -> bool:
        certificate = self._certificates.get(sender)
        return certificate is not None and self._channel.verify_for_secagg(certificate, payload, signature)

    def _refusing(self, stage: str, step: Callable[[], T]) -> T:
        """Runs a protocol step; a refusal (forged, replayed, greedy) is audited, then raised."""
        try:
            return step()
        except ProtocolError as exc:
            self._channel.record_secagg_refusal(stage, str(exc))
            raise

    def _call(self, stage: Stage, limit_s: float, **payload: object) -> SecAggAnswer:
        """Posts this stage's message, then polls until the PS answers ``ready`` (at most ``limit_s``)."""
        deadline = time.monotonic() + limit_s
        call = SecAggCall(self._worker_id, self._tag.round, self._tag.nonce, stage, max_wait_s=POLL_S,
                          **payload)  # type: ignore[arg-type]
        answer = self._channel.secagg_exchange(call)
        while answer.status != "ready":
            if self._stop.is_set() or time.monotonic() > deadline:
                raise RoundError(f"round {self._tag.round}: no answer to the {stage} stage within {limit_s:.0f}s")
            answer = self._channel.secagg_exchange(SecAggCall(self._worker_id, self._tag.round, self._tag.nonce,
                                                              stage, poll=True, max_wait_s=POLL_S))
        return answer

    def keys(self) -> None:
        """Stages 1 and 2: advertise keys, check the roster, send and receive shares."""
        limit = 2 * self._timeout_s + POLL_S
        advert: KeyAdvert = self._client.advertise()
        answer = self._call("advertise", limit, advert=advert, certificate=self._own_certificate)
        self._certificates = dict(answer.certificates)
        roster = Roster(self._tag, answer.roster)
        packets = self._refusing("share", lambda: self._client.share(roster))
        answer = self._call("share", limit, shares=tuple(packets))
        self._inbox = answer.inbox
        log.info("worker %s round %d: secure aggregation keys exchanged with %d workers, %d shares received",
                 self._name, self._tag.round, len(roster.adverts), len(answer.inbox))
        if _crash_requested(self._name, self._tag.round):
            log.warning("worker %s round %d: TEST HOOK %s: killing this process after the share stage",
                        self._name, self._tag.round, CRASH_AFTER_SHARE_ENV)
            os.kill(os.getpid(), signal.SIGKILL)

    def mask(self, update: ParamSet, template: StreamHeader, num_samples: int) -> tuple[ParamSet, UpdateKind]:
        """Stage 3: the masked upload (one uint32 tensor) for this update and weight.

        Raises:
            ValueError: the update does not fit ``template`` (the model the round started from).
        """
        flat = flatten_update(update, template)
        masked = self._refusing("upload", lambda: self._client.upload(self._inbox, flat, num_samples))
        return ParamSet([(MASKED_TENSOR, np.ascontiguousarray(masked.vector, dtype=np.uint32))]), UpdateKind.MASKED

    def unmask(self) -> None:
        """Stage 4: waits for the PS's unmask request and answers it (refusing a greedy one)."""
        answer = self._call("ready", READY_LIMIT_S)
        if answer.request is None:
            raise ProtocolError(f"round {self._tag.round}: the PS's unmask answer holds no request")
        request = answer.request
        reply = self._refusing("unmask", lambda: self._client.unmask(request))
        self._call("unmask", self._timeout_s + POLL_S, reply=reply)
        log.info("worker %s round %d: unmask shares sent (%d survivors, %d dropped)", self._name, self._tag.round,
                 len(answer.request.survivors), len(answer.request.dropped))
