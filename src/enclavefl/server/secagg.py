"""Secure aggregation on the PS: the round's key and unmask stages, and the modular sum of masked uploads.

How this works: :class:`SecAggCoordinator` is the strategy's
:class:`~enclavefl.server.strategy.RoundStages`. When the engine opens a round
attempt it starts a :class:`~enclavefl.privacy.secagg.server.SecAggServer` for the
sampled workers under a fresh nonce, which the train tasks carry. Workers then
call :meth:`SecAggCoordinator.exchange` once per stage (through the transport's
``SecAggExchange``): advertise keys, share keys, wait for the unmask request,
answer it. A stage closes when every worker still in the round (not dropped by the
PS's liveness check) has posted, or when ``stage_timeout_s`` has passed,
whichever comes first; whoever is waiting closes it. Masked uploads arrive as ordinary updates of kind ``masked`` and are
folded by :class:`ModularSum` inside the round's accept transition, so the PS holds
one uint32 vector whatever the number of workers; only workers whose shares were
accepted may upload. After the upload window :meth:`SecAggCoordinator.finish`
asks the survivors for their shares, removes the masks and hands the close
pipeline the weighted mean (central DP noise, if on, is added after this).
Below the threshold it raises RoundError before asking anything: the engine
retries the round and no mask is removed.

The coordinator has its own lock, taken after the server lock where both are
held (``open``, ``admit``) and never the other way round.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import final

import numpy as np

from enclavefl.config import SecureAggregationConfig
from enclavefl.errors import ProtocolError, RoundError, UpdateRejected
from enclavefl.messages import ConfigValue, PeerIdentity, UpdateKind
from enclavefl.privacy.secagg.identity import KnownKeys, certificate_fingerprint
from enclavefl.privacy.secagg.messages import Roster, RoundTag, ShareCiphertext, UnmaskRequest
from enclavefl.privacy.secagg.params import SecAggParams
from enclavefl.privacy.secagg.server import SecAggServer
from enclavefl.privacy.secagg.stages import (
    NONCE_KEY,
    SecAggAnswer,
    SecAggCall,
    masked_template,
    task_config,
    unflatten_mean,
)
from enclavefl.server.aggregator import Aggregator
from enclavefl.tensors import ParamSet, StreamHeader

__all__ = ["FixedAggregate", "ModularSum", "SecAggCoordinator", "params_of"]

log = logging.getLogger(__name__)

MAX_POLL_S = 30.0
"""The longest one stage call waits before answering ``pending``."""

def params_of(config: SecureAggregationConfig) -> SecAggParams:
    """The protocol's parameters from the job's ``privacy.secure_aggregation`` section."""
    return SecAggParams(threshold=config.threshold, neighbours=config.neighbours,
                        quantization_bits=config.quantization_bits, clip_range=config.clip_range,
                        rounding=config.rounding, weight_cap=config.weight_cap, min_share_ratio=config.min_share_ratio)


@final
class ModularSum(Aggregator):
    """Folds masked uint32 vectors modulo 2**32: O(model) memory, whatever the number of workers.

    ``weight`` is ignored: each worker's weight travels masked inside its vector.
    """

    def __init__(self, template: StreamHeader) -> None:
        if len(template.tensors) != 1 or template.tensors[0].dtype != "uint32":
            raise ValueError("ModularSum takes the one-tensor uint32 header of a masked upload")
        spec = template.tensors[0]
        self._name = spec.name
        self._sum = np.zeros(spec.shape, dtype=np.uint32)
        self._count = 0
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        return self._count

    @property
    def total(self) -> np.ndarray:
        """A copy of the running sum."""
        with self._lock:
            return self._sum.copy()

    def add(self, update: ParamSet, weight: float) -> None:
        """Adds one masked vector (mod 2**32).

        Raises:
            UpdateRejected: the update is not exactly the masked tensor of the template's shape.
        """
        value = update.get(self._name) if list(update.keys()) == [self._name] else None
        if not isinstance(value, np.ndarray) or value.dtype != np.uint32 or value.shape != self._sum.shape:
            raise UpdateRejected(f"a masked upload is one uint32 tensor {self._name!r} of shape {self._sum.shape}")
        with self._lock:
            self._sum += value  # uint32 wraps: addition in Z_{2^32}
            self._count += 1

    def result(self) -> ParamSet:
        if self._count == 0:
            raise UpdateRejected("no masked update was added")
        return ParamSet([(self._name, self.total)])


@final
class FixedAggregate(Aggregator):
    """An aggregate computed elsewhere (the unmasked mean), for the close pipeline to read."""

    def __init__(self, aggregate: ParamSet, count: int) -> None:
        self._aggregate = aggregate
        self._count = count

    @property
    def count(self) -> int:
        return self._count

    def add(self, update: ParamSet, weight: float) -> None:
        raise UpdateRejected("the aggregate is final: nothing may be added after unmasking")

    def result(self) -> ParamSet:
        return self._aggregate


@dataclass(eq=False)
class _Attempt:
    """One round attempt's protocol state on the PS."""

    server: SecAggServer
    sampled: frozenset[str]
    stage: str = "advertise"  # advertise -> share -> upload -> unmask -> done
    deadline: float = 0.0
    certificates: dict[str, bytes] = field(default_factory=dict)
    roster: Roster | None = None
    inboxes: dict[str, list[ShareCiphertext]] = field(default_factory=dict)
    request: UnmaskRequest | None = None
    replied: set[str] = field(default_factory=set)
    dropped: set[str] = field(default_factory=set)
    failure: str = ""


@final
class SecAggCoordinator:
    """The PS's secure-aggregation stages of every synchronous round (a RoundStages)."""

    def __init__(self, config: SecureAggregationConfig, template: StreamHeader, *, equal_weights: bool) -> None:
        """Prepares the stages for updates shaped like ``template`` (the dense upload header).

        Args:
            equal_weights: every worker weighs 1 (DP-FedAvg's equal weights); else min(num_samples, weight_cap).
        """
        self._config = config
        self._params = params_of(config)
        self._template = template
        self._wire = masked_template(template)
        self._length = self._wire.tensors[0].shape[0] - 1
        self._task_config = task_config(self._params, config.stage_timeout_s, equal_weights=equal_weights)
        self._cond = threading.Condition()
        self._attempt: _Attempt | None = None
        self._last: dict[str, int] = {}
        self._keys = KnownKeys()  # a worker signs with the certificate bound at its join: parsed once per job

    @property
    def task_config(self) -> Mapping[str, ConfigValue]:
        """The job-wide settings every train task carries."""
        return dict(self._task_config)

    def upload(self, template: StreamHeader) -> tuple[StreamHeader, UpdateKind]:
        """What workers upload for updates shaped like ``template``: one masked uint32 tensor."""
        return masked_template(template), UpdateKind.MASKED

    def aggregator(self, template: StreamHeader) -> ModularSum:
        """The round's aggregator over the masked header."""
        return ModularSum(template)

    # ------------------------------------------------------------------ RoundStages
    def open(self, round_: int, attempt: int, sampled: frozenset[str]) -> Mapping[str, ConfigValue]:
        tag = RoundTag(round_, os.urandom(16))
        with self._cond:
            current = _Attempt(SecAggServer(tag, self._params, sampled, self._verify, self._length), sampled)
            current.deadline = time.monotonic() + self._config.stage_timeout_s
            self._attempt = current
            self._cond.notify_all()
        log.info("secagg round %d attempt %d: opened for %d workers (nonce %s)", round_, attempt, len(sampled),
                 tag.nonce.hex()[:8])
        return {**self._task_config, NONCE_KEY: tag.nonce.hex()}

    def admit(self, worker_id: str) -> None:
        with self._cond:
            current = self._attempt
            if current is None or current.stage != "upload" or worker_id not in current.server.shared:
                stage = "none" if current is None else current.stage
                raise UpdateRejected(f"worker {worker_id} did not complete this round's secure-aggregation key "
                                     f"stages (stage {stage}): its masks could not be removed")

    def on_drop(self, worker_id: str) -> None:
        with self._cond:
            if self._attempt is not None and worker_id in self._attempt.sampled:
                self._attempt.dropped.add(worker_id)
                self._cond.notify_all()

    def finish(self, pushed: frozenset[str], aggregator: Aggregator) -> Aggregator:
        if not isinstance(aggregator, ModularSum):
            raise RoundError("secure aggregation needs the round's ModularSum aggregator")
        with self._cond:
            current = self._attempt
            if current is None or current.stage != "upload":
                raise RoundError(f"secure aggregation: the key stages did not complete "
                                 f"({'no attempt' if current is None else current.failure or current.stage})")
            server = current.server
            try:
                server.adopt_uploads(pushed, aggregator.total)
                current.request = server.unmask_request()
            except (RoundError, ProtocolError) as exc:
                self._fail(current, str(exc))
                raise RoundError(str(exc)) from exc
            current.stage = "unmask"
            current.deadline = time.monotonic() + self._config.stage_timeout_s
            self._cond.notify_all()
            survivors = set(current.request.survivors)
            log.info("secagg round %d: unmasking %d survivors (%d dropped after sharing), threshold %d",
                     server.tag.round, len(survivors), len(current.request.dropped), server.threshold)
            while current.replied < survivors - current.dropped:
                remaining = current.deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            try:
                result = server.finish()
            except (RoundError, ProtocolError) as exc:
                self._fail(current, str(exc))
                raise RoundError(str(exc)) from exc
            current.stage = "done"
            self._last = {"secagg_survivors": len(result.survivors), "secagg_dropped": len(current.request.dropped),
                          "secagg_threshold": server.threshold}
            self._cond.notify_all()
        mean = unflatten_mean(result.mean, self._template)
        return FixedAggregate(mean, len(result.survivors))

    def row(self) -> Mapping[str, int]:
        """The last unmasked round's figures for its metrics row: survivors, workers dropped after sharing, t."""
        with self._cond:
            return dict(self._last)

    def abandon(self) -> None:
        with self._cond:
            if self._attempt is not None:
                self._fail(self._attempt, "the round attempt ended")

    def _fail(self, current: _Attempt, why: str) -> None:
        current.stage = "done"
        current.failure = current.failure or why
        self._cond.notify_all()

    # ------------------------------------------------------------------ stage calls
    def _verify(self, sender: str, payload: bytes, signature: bytes) -> bool:
        current = self._attempt  # called with the lock held, from receive_advert
        cert = current.certificates.get(sender) if current is not None else None
        return cert is not None and self._keys.verify(cert, payload, signature)

    def _advance(self, current: _Attempt) -> None:
        """Closes the open key stage if everyone posted or its window passed (lock held)."""
        now = time.monotonic()
        server = current.server
        try:
            if current.stage == "advertise" and (current.sampled - current.dropped <= current.certificates.keys()
                                                 or now >= current.deadline):
                current.roster = server.roster()
                log.info("secagg round %d: keys of %d of %d workers advertised", server.tag.round,
                         len(current.roster.adverts), len(current.sampled))
                current.stage, current.deadline = "share", now + self._config.stage_timeout_s
                self._cond.notify_all()
            if current.stage == "share" and current.roster is not None and (
                    {a.sender for a in current.roster.adverts} - current.dropped <= server.shared
                    or now >= current.deadline):
                current.inboxes = server.inboxes()
                log.info("secagg round %d: shares of %d workers relayed", server.tag.round, len(server.shared))
                current.stage = "upload"
                self._cond.notify_all()
        except RoundError as exc:
            log.warning("secagg round %d: %s", server.tag.round, exc)
            self._fail(current, str(exc))

    def exchange(self, peer: PeerIdentity, call: SecAggCall) -> SecAggAnswer:
        """One worker's stage call (see :class:`~enclavefl.privacy.secagg.stages.SecAggHandler`).

        Raises:
            ProtocolError: a refused message (forged signature, a certificate other than the
                one bound at join, a bundle under another name, a replay, out of stage).
            RoundError: no open attempt has this round and nonce, or it failed.
        """
        deadline = time.monotonic() + min(max(call.max_wait_s, 0.0), MAX_POLL_S)
        with self._cond:
            current = self._attempt
            if current is None or current.server.tag != call.tag:
                raise RoundError(f"round {call.round}: no open secure-aggregation attempt with this nonce")
            if call.worker_id not in current.sampled:
                raise ProtocolError(f"round {call.round}: worker {call.worker_id} is not in this attempt")
            if not call.poll:
                self._post(current, peer, call)
            while True:
                self._advance(current)
                if current.failure:
                    raise RoundError(f"round {call.round}: secure aggregation failed: {current.failure}")
                answer = self._answer(current, call)
                if answer is not None:
                    return answer
                now = time.monotonic()
                if now >= deadline:
                    return SecAggAnswer("pending")
                wake = min(deadline, current.deadline) if current.stage in ("advertise", "share") else deadline
                self._cond.wait(max(wake - now, 0.01))

    def _post(self, current: _Attempt, peer: PeerIdentity, call: SecAggCall) -> None:
        server = current.server
        if call.stage == "advertise":
            advert = call.advert
            if advert is None or advert.sender != call.worker_id:
                raise ProtocolError(f"round {call.round}: worker {call.worker_id} advertised keys under another name")
            if current.stage != "advertise":
                raise ProtocolError(f"round {call.round}: keys from {call.worker_id} after the advertise stage closed")
            if certificate_fingerprint(call.certificate) != peer.fingerprint:
                raise ProtocolError(f"round {call.round}: worker {call.worker_id} signed its keys with a certificate "
                                    "other than the one bound at its join")
            if call.worker_id in current.certificates:
                raise ProtocolError(f"round {call.round}: second key advert from {call.worker_id}")
            current.certificates[call.worker_id] = call.certificate
            try:
                server.receive_advert(advert)
            except ProtocolError:
                del current.certificates[call.worker_id]
                raise
        elif call.stage == "share":
            if current.stage != "share":
                raise ProtocolError(f"round {call.round}: shares from {call.worker_id} in stage {current.stage}")
            server.receive_shares(call.worker_id, call.shares)
        elif call.stage == "unmask":
            reply = call.reply
            if reply is None or reply.sender != call.worker_id:
                raise ProtocolError(f"round {call.round}: unmask reply from {call.worker_id} under another name")
            if current.stage != "unmask":
                raise ProtocolError(f"round {call.round}: unmask reply from {call.worker_id} in stage {current.stage}")
            server.receive_unmask(reply)
            current.replied.add(call.worker_id)
            if current.request is not None and current.replied >= set(current.request.survivors) - current.dropped:
                self._cond.notify_all()  # finish() waits for exactly this
        # No wake-up per post: stage callers wait for a stage change, which _advance announces.
        # Waking every waiting worker on each of n posts made the key stages cost O(n^2) wake-ups.

    def _answer(self, current: _Attempt, call: SecAggCall) -> SecAggAnswer | None:
        """The worker's input for its next stage, or None while that stage is still open (lock held)."""
        order = ("advertise", "share", "upload", "unmask", "done")
        reached = order.index(current.stage)
        if call.stage == "advertise" and reached >= 1 and current.roster is not None:
            # Only its neighbours' certificates: the worker checks no other signature, and with n
            # workers of ~11 KB RA-TLS certificates each, all of them made every answer O(n).
            try:
                neighbours = current.server.neighbours(call.worker_id)
            except KeyError:
                neighbours = ()  # not in the roster (its advert was refused): the worker refuses the roster
            return SecAggAnswer("ready", roster=current.roster.adverts,
                                certificates={v: current.certificates[v] for v in neighbours})
        if call.stage == "share" and reached >= 2:
            if call.worker_id not in current.inboxes:
                raise RoundError(f"round {call.round}: worker {call.worker_id}'s shares did not reach the PS in time")
            return SecAggAnswer("ready", inbox=tuple(current.inboxes[call.worker_id]))
        if call.stage == "ready" and reached >= 3 and current.request is not None:
            if call.worker_id not in current.request.survivors:
                raise RoundError(f"round {call.round}: worker {call.worker_id}'s masked update was not counted")
            return SecAggAnswer("ready", request=current.request)
        if call.stage == "unmask" and call.worker_id in current.replied:
            return SecAggAnswer("ready")
        return None
