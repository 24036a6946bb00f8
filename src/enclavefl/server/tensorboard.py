"""TensorBoard event files from the metrics rows: one scalar per metric per round.

How this works: a :class:`TensorBoardLog` is a
:data:`~enclavefl.server.metrics.RowListener`. For each completed round it
appends one ``Event`` record holding a scalar per metric (losses, accuracies,
bytes, phase durations, the privacy budget when the row has one), with the
round number as the step, to an event file under ``<run>/tensorboard/``.
Each row is written and flushed synchronously, opening the file in append
mode and closing it again: a round costs one small write, there is no
background thread to stop, and a PS killed mid-job leaves a readable file.

The event file is TensorBoard's record format: each record is
``uint64 length, uint32 masked CRC-32C(length), data, uint32 masked CRC-32C(data)``,
little-endian, and the first record carries ``file_version: "brain.Event:2"``.
The protobuf messages and the CRC come from the ``tensorboardX`` package
(``pip install 'enclavefl[tensorboard]'``), imported only when a log is opened,
so a job without ``summary.tensorboard`` never needs it.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

from enclavefl.errors import ConfigError

__all__ = ["TensorBoardLog", "scalars_of_row"]

_GROUPS: Final = ("train", "eval", "bytes", "seconds")
"""Row keys ``<group>_<name>`` become the tag ``<group>/<name>`` (``eval_loss`` -> ``eval/loss``)."""

_ROUND_KEYS: Final = ("participants", "sampled", "rejected", "dropped", "model_version")
"""Counts of the round worth a chart (``round/participants``, ...)."""


def scalars_of_row(row: Mapping[str, Any]) -> dict[str, float]:
    """The TensorBoard tags and values of one metrics row (only finite numbers; booleans and lists skipped).

    ``train_loss`` -> ``train/loss``, ``bytes_in`` -> ``bytes/in``, ``seconds_wait`` -> ``seconds/wait``,
    any key holding ``epsilon`` -> ``privacy/<key>``, ``participants`` -> ``round/participants``.
    """
    out: dict[str, float] = {}
    for key, value in row.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        group, _, name = key.partition("_")
        if "epsilon" in key:
            out[f"privacy/{key}"] = float(value)
        elif group in _GROUPS and name:
            out[f"{group}/{name}"] = float(value)
        elif key in _ROUND_KEYS:
            out[f"round/{key}"] = float(value)
    return out


def _masked_crc(crc32c: Callable[[bytes], int], data: bytes) -> int:
    # The record format stores a rotated, offset CRC so a CRC of CRC-bearing data stays informative.
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class TensorBoardLog:
    """Appends each metrics row to a TensorBoard event file as scalars (step = the row's round).

    Thread-safe; call it with rows (it is a :data:`~enclavefl.server.metrics.RowListener`).
    """

    def __init__(self, directory: Path) -> None:
        """Creates ``directory`` and a new event file in it (a resumed job gets a second file).

        Raises:
            ConfigError: the ``tensorboard`` extra (the ``tensorboardX`` package) is not installed.
        """
        try:
            from tensorboardX.crc32c import crc32c
            from tensorboardX.proto.event_pb2 import Event
            from tensorboardX.proto.summary_pb2 import Summary
        except ImportError as exc:
            raise ConfigError(
                "summary.tensorboard is true but the tensorboardX package is missing; "
                "install the extra: pip install 'enclavefl[tensorboard]' (or set summary.tensorboard: false)"
            ) from exc
        self._crc32c: Callable[[bytes], int] = crc32c
        self._event = Event
        self._summary = Summary
        self._lock = threading.Lock()
        directory.mkdir(parents=True, exist_ok=True)
        # TensorBoard finds files by the "tfevents" part of the name; pid and host keep two PS apart.
        self.path = directory / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self._write([Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString()])

    def __call__(self, row: Mapping[str, Any]) -> None:
        """Writes the row's scalars at step ``row["round"]`` (a row without a round number is skipped)."""
        step = row.get("round")
        if isinstance(step, bool) or not isinstance(step, int):
            return
        scalars = scalars_of_row(row)
        if not scalars:
            return
        wall = row.get("time")
        summary = self._summary(value=[self._summary.Value(tag=tag, simple_value=value)
                                       for tag, value in sorted(scalars.items())])
        event = self._event(wall_time=float(wall) if isinstance(wall, (int, float)) else time.time(),
                            step=step, summary=summary)
        self._write([event.SerializeToString()])

    def _write(self, records: list[bytes]) -> None:
        chunks: list[bytes] = []
        for data in records:
            header = struct.pack("<Q", len(data))
            chunks += [header, struct.pack("<I", _masked_crc(self._crc32c, header)),
                       data, struct.pack("<I", _masked_crc(self._crc32c, data))]
        with self._lock, self.path.open("ab") as f:
            f.write(b"".join(chunks))
