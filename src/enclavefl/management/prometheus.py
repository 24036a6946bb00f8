"""``GET /metrics``: a running job in the Prometheus text format.

How this works: each scrape brings a per-job :class:`JobMetrics` up to date,
then renders its own ``CollectorRegistry`` (never the process-wide default,
so two jobs in one process, or a test, never share a series). Bringing it up
to date is three reads of the :class:`~enclavefl.management.schema.JobHandle`,
all quick and non-blocking:

- the metrics rows not seen yet (``handle.rounds``): rounds completed, bytes in
  and out, and the phase durations (``seconds_*``) into histograms. Rows are
  paged by offset, so none is missed however rarely Prometheus scrapes;
- the events after the last one seen (``handle.events``): updates accepted and
  refused by reason class, attestation decisions by verdict, worker state
  changes and operator actions. The bus is a bounded ring: events that fell
  out of it between two scrapes are counted in ``enclavefl_events_missed_total``;
- ``handle.status()``: the gauges (round, participants, model version, ...).

Nothing runs between scrapes: no thread, nothing to stop. Labels take values
from small fixed sets (a refusal's free-text reason becomes one of
:data:`REASON_CLASSES`); no worker id or name ever becomes a label.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from typing import Any, Final, get_args

from fastapi import Depends, FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Enum, Gauge, Histogram, Info
from prometheus_client import generate_latest

from enclavefl.management.api import require_read
from enclavefl.management.schema import JobHandle, JobState

__all__ = ["REASON_CLASSES", "JobMetrics", "mount", "reason_class"]

_ROWS_PAGE: Final = 500
_EVENTS_PAGE: Final = 1000
_PHASE_BUCKETS_S: Final = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)
_EVIDENCE: Final = frozenset({"sgx", "tdx", "simulated", "none"})
_WORKER_STATES: Final = frozenset({"joined", "training", "uploaded", "dropped", "left"})
_ACTIONS: Final = frozenset({"stop", "pause", "resume", "config"})
_PHASE_KEY: Final = re.compile(r"^seconds_([a-z][a-z0-9_]{0,31})$")

# First match wins: the patterns look at the PS's own refusal messages (server/staging.py,
# server/round.py, tensors.py, ...), most specific first.
_REASON_PATTERNS: Final = (
    ("not_finite", re.compile(r"nan|inf\b|not finite|overflow", re.I)),
    ("too_large", re.compile(r"too large|too many|exceeds|over the limit|max_\w*bytes|limit", re.I)),
    ("shape", re.compile(r"shape|dtype|header|does not fit|tensor|mismatch|layout", re.I)),
    ("stale", re.compile(r"stale|staleness|old model|model version", re.I)),
    ("late", re.compile(r"closed|no round is open|no buffer is open|not open|window|late|too slow", re.I)),
    ("not_sampled", re.compile(r"not sampled|not selected|not in the round|unknown worker", re.I)),
    ("duplicate", re.compile(r"already|twice|duplicate", re.I)),
    ("weight", re.compile(r"weight|num_samples|sample count", re.I)),
    ("robust", re.compile(r"norm|clip|outlier|krum|trimmed|median", re.I)),
    ("metrics", re.compile(r"metric", re.I)),
    ("storage", re.compile(r"spill|disk", re.I)),
)
REASON_CLASSES: Final = ("accepted", *(name for name, _ in _REASON_PATTERNS), "other")
"""Every value the ``reason`` label of ``enclavefl_updates_total`` can take."""


def reason_class(reason: str) -> str:
    """The low-cardinality class of an update refusal's free-text reason (one of :data:`REASON_CLASSES`).

    A reason that already is a class name (a PS may publish one) is kept as it is.
    """
    text = reason.strip()
    if text in REASON_CLASSES:
        return text
    for name, pattern in _REASON_PATTERNS:
        if pattern.search(text):
            return name
    return "other"


def _one_of(value: Any, allowed: frozenset[str], default: str = "other") -> str:
    return value if isinstance(value, str) and value in allowed else default


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if value >= 0 else None


class JobMetrics:
    """The Prometheus series of one job, brought up to date from its handle at each :meth:`render`."""

    def __init__(self, handle: JobHandle) -> None:
        self._handle = handle
        self._lock = threading.Lock()
        self._after = 0
        self._rows_seen = 0
        self.registry = CollectorRegistry()
        r = self.registry
        self._info = Info("enclavefl_job", "The job this PS runs.", registry=r)
        self._state = Enum("enclavefl_job_state", "The job's state.", states=list(get_args(JobState)), registry=r)
        self._round = Gauge("enclavefl_round", "The open round, or the next one to open.", registry=r)
        self._rounds = Gauge("enclavefl_rounds", "Rounds the job runs in all.", registry=r)
        self._rounds_left = Gauge("enclavefl_rounds_left", "Rounds still to run.", registry=r)
        self._participants = Gauge("enclavefl_participants", "Workers sampled for the open round.", registry=r)
        self._open_updates = Gauge("enclavefl_round_updates", "Updates accepted in the open round so far.",
                                   registry=r)
        self._joined = Gauge("enclavefl_workers_joined", "Workers joined to the job.", registry=r)
        self._version = Gauge("enclavefl_model_version", "Version of the global model.", registry=r)
        self._uptime = Gauge("enclavefl_uptime_seconds", "Seconds since the PS started.", registry=r)
        self._completed = Counter("enclavefl_rounds_completed", "Rounds aggregated (metrics rows).", registry=r)
        self._bytes = Counter("enclavefl_bytes", "Bytes of completed rounds: in = updates, out = models.",
                              ["direction"], registry=r)
        self._phase = Histogram("enclavefl_round_phase_seconds", "Seconds each phase of a completed round took.",
                                ["phase"], buckets=_PHASE_BUCKETS_S, registry=r)
        self._updates = Counter("enclavefl_updates", "Worker updates by outcome and reason class.",
                                ["result", "reason"], registry=r)
        self._attestation = Counter("enclavefl_attestation_decisions",
                                    "Attestation decisions (weaker: accepted on a policy allowance).",
                                    ["verdict", "evidence"], registry=r)
        self._workers = Counter("enclavefl_worker_transitions", "Worker state changes.", ["state"], registry=r)
        self._control = Counter("enclavefl_control_actions", "Operator requests (stop, pause, resume, config).",
                                ["action"], registry=r)
        self._missed = Counter("enclavefl_events_missed", "Events that left the bus before a scrape read them.",
                               registry=r)
        for direction in ("in", "out"):
            self._bytes.labels(direction)
        for result, reason in [("accepted", "accepted"), *(("rejected", c) for c in REASON_CLASSES[1:])]:
            self._updates.labels(result, reason)  # every series exists from the start (rate() needs a 0)

    def render(self) -> bytes:
        """Brings every series up to date and returns them in the Prometheus text format."""
        with self._lock:
            self._follow_rows()
            self._follow_events()
            self._read_status()
            return generate_latest(self.registry)

    # ------------------------------------------------------------ sources
    def _follow_rows(self) -> None:
        while True:
            page = self._handle.rounds(self._rows_seen, _ROWS_PAGE)
            for row in page.rows:
                self._count_row(row)
            self._rows_seen += len(page.rows)
            if not page.rows or self._rows_seen >= page.total:
                return

    def _count_row(self, row: Mapping[str, Any]) -> None:
        self._completed.inc()
        for direction in ("in", "out"):
            value = _number(row.get(f"bytes_{direction}"))
            if value is not None:
                self._bytes.labels(direction).inc(value)
        for key, value in row.items():
            match = _PHASE_KEY.match(key)
            seconds = _number(value)
            if match and seconds is not None:
                self._phase.labels(match.group(1)).observe(seconds)

    def _follow_events(self) -> None:
        bus = self._handle.events
        while True:
            batch = bus.read(self._after, timeout_s=0.0, limit=_EVENTS_PAGE)
            if batch.missed:
                self._missed.inc(batch.missed)
            for event in batch.events:
                self._count_event(event.kind, event.data)
            self._after = batch.last_seq
            if len(batch.events) < _EVENTS_PAGE:
                return

    def _count_event(self, kind: str, data: Mapping[str, Any]) -> None:
        if kind == "update":
            if data.get("accepted") is True:
                self._updates.labels("accepted", "accepted").inc()
            else:
                self._updates.labels("rejected", reason_class(str(data.get("reason") or ""))).inc()
        elif kind == "attestation":
            evidence = _one_of(data.get("evidence"), _EVIDENCE, "none")
            if data.get("decision") == "accepted":
                verdict = "weaker" if data.get("weaker") else "accepted"
            else:
                verdict = "refused"
            self._attestation.labels(verdict, evidence).inc()
        elif kind == "worker":
            self._workers.labels(_one_of(data.get("state"), _WORKER_STATES)).inc()
        elif kind == "control":
            self._control.labels(_one_of(data.get("action"), _ACTIONS)).inc()

    def _read_status(self) -> None:
        status = self._handle.status()
        self._info.info({"job": status.job, "instance": status.instance,
                         "attestation_mode": status.attestation_mode, "evidence": status.identity.evidence})
        self._state.state(status.state)
        self._round.set(status.round)
        self._rounds.set(status.rounds)
        self._rounds_left.set(status.rounds_left)
        self._participants.set(status.participants)
        self._open_updates.set(status.updates)
        self._joined.set(status.workers_joined)
        self._version.set(status.model_version)
        self._uptime.set(status.uptime_s)


def mount(app: FastAPI, handle: JobHandle) -> None:
    """Serves ``GET /metrics`` for ``handle`` on an app made by :func:`~enclavefl.management.api.create_app`.

    It is a read route: it needs the job's bearer token unless ``management.public_read``
    (Prometheus sends one with ``authorization: {credentials_file: <run>/management.token}``).
    """
    metrics = JobMetrics(handle)

    def scrape() -> Response:
        return Response(content=metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/metrics", scrape, methods=["GET"], include_in_schema=False,
                      dependencies=[Depends(require_read)])
