"""An algorithm whose uploads have another layout than the one its client algorithm gives.

Optional privacy stages change what a worker uploads without changing what the
client algorithm does around local training: adaptive clipping appends one
bit (``dp/unclipped``), SignDS replaces the whole delta by indices and a sign.
:class:`UploadLayout` wraps the round's :class:`~enclavefl.server.algorithms.Algorithm`
and changes only :meth:`upload_template`, the header every update must match;
everything else, including the checkpointed state, is the wrapped algorithm's.
The stage that changes the layout also supplies the aggregator that reads it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import final

from enclavefl.config import ClientConfig
from enclavefl.messages import ClientSettings
from enclavefl.server.algorithms import Algorithm, CloseContext
from enclavefl.server.optimizer import ServerOptimizer
from enclavefl.server.state import PartState
from enclavefl.tensors import ParamSet, StreamHeader

__all__ = ["UploadLayout"]


@final
class UploadLayout(Algorithm):
    """``inner`` with its upload template passed through ``layout``."""

    name = "upload-layout"

    def __init__(self, inner: Algorithm, layout: Callable[[StreamHeader], StreamHeader]) -> None:
        self.inner = inner
        self._layout = layout

    def client_settings(self, client: ClientConfig, round_: int) -> ClientSettings:
        return self.inner.client_settings(client, round_)

    def broadcast(self, params: ParamSet) -> ParamSet:
        return self.inner.broadcast(params)

    def upload_template(self, model: StreamHeader) -> StreamHeader:
        return self._layout(self.inner.upload_template(model))

    def apply(self, params: ParamSet, aggregate: ParamSet, optimizer: ServerOptimizer, context: CloseContext) -> ParamSet:
        return self.inner.apply(params, aggregate, optimizer, context)

    def state(self) -> PartState:
        return self.inner.state()

    def load_state(self, state: PartState) -> None:
        self.inner.load_state(state)
