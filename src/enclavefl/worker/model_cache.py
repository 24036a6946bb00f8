"""The worker's copy of the last model it downloaded, so that the PS can send only what changed since.

How this works: before each pull the worker asks :meth:`ModelCache.held_version`
which version to announce (``PullRequest.model_version``): the version of its
copy if that copy came from the PS instance it is joined to now, else -1 (a full
download). After the pull, :meth:`ModelCache.resolve` turns what arrived into
the full model (changed rows applied to the copy, quantized tensors decoded;
:func:`~enclavefl.download_codec.resolve_download`) and keeps it as the new copy.

A copy is tied to the PS instance it came from: a restarted PS (a new instance,
perhaps resumed from an older checkpoint) may make another model under the same
version number, so after a re-join to another instance the worker asks for a
full download. A download that cannot be resolved drops the copy, so the next
pull is a full one. The copy costs one model's memory between rounds; during a
round it is the model the worker trains from and computes its delta against, so
it costs nothing more then.
"""

from __future__ import annotations

import logging
import threading
from typing import final

from enclavefl.download_codec import NO_MODEL, resolve_download
from enclavefl.errors import ProtocolError
from enclavefl.tensors import ParamSet

__all__ = ["ModelCache"]

log = logging.getLogger(__name__)

@final
class ModelCache:
    """The last resolved download, its version and the PS instance it came from."""

    def __init__(self, enabled: bool = True) -> None:
        """An empty cache.

        Args:
            enabled: False keeps nothing: every pull is a full download (no model is held between rounds).
        """
        self._enabled = enabled
        self._lock = threading.Lock()
        self._instance = ""
        self._version = NO_MODEL
        self._params: ParamSet | None = None

    def held_version(self, ps_instance: str) -> int:
        """The version to announce to PS instance ``ps_instance``: the copy's, or -1 if it is not from that instance."""
        with self._lock:
            if self._params is None or self._instance != ps_instance:
                return NO_MODEL
            return self._version

    def resolve(self, ps_instance: str, held: int, version: int, download: ParamSet) -> ParamSet:
        """The full model of ``version`` that ``download`` stands for; kept as the new copy.

        Args:
            ps_instance: the instance the download came from.
            held: the version the worker announced for this pull (:meth:`held_version`).
            version: the version the PS says the download is.
            download: what arrived.

        Raises:
            ProtocolError: the download does not resolve against the copy of ``held`` (the copy is dropped),
                or ``version`` is older than ``held``.
        """
        with self._lock:
            base = self._params if held != NO_MODEL and self._instance == ps_instance and self._version == held else None
        try:
            if held != NO_MODEL and version < held:
                raise ProtocolError(f"download: the PS sent model version {version}, older than version {held} "
                                    "this worker holds")
            params = resolve_download(download, base, held)
        except ProtocolError:
            self.clear()
            raise
        if self._enabled:
            with self._lock:
                self._instance, self._version, self._params = ps_instance, version, params
        return params

    def clear(self) -> None:
        """Forgets the copy: the next pull is a full download."""
        with self._lock:
            self._instance, self._version, self._params = "", NO_MODEL, None
