"""The worker's clipping step for client-level differential privacy (DP-FedAvg).

McMahan et al. 2018 ("Learning Differentially Private Recurrent Language
Models") bound each client's contribution by clipping its whole update to L2
norm ``clip_norm`` before the server averages and adds noise. The bound comes
from the PS with every train task (``privacy.dp.clip_norm`` in the task's
config map), so a worker never clips with a stale value of its own; a task
without it passes the update unchanged. Put this step last, after every
transform that changes the values (it must bound what is uploaded).

With adaptive clipping (Andrew et al. 2021, "Differentially Private Learning
with Adaptive Clipping") the task also carries ``privacy.dp.adaptive_clipping``
and the step appends the bit ``[||delta|| <= clip_norm]``, measured before
clipping, as the float32 scalar tensor ``dp/unclipped``; the PS counts the bits
privately and moves the bound.
"""

from __future__ import annotations

from typing import final

import numpy as np

from enclavefl.messages import DP_ADAPTIVE_KEY, DP_CLIP_NORM_KEY, DP_UNCLIPPED_TENSOR, UpdateKind
from enclavefl.norms import clip_update, update_norm
from enclavefl.tensors import ParamSet
from enclavefl.worker.pipeline import UpdateContext

__all__ = ["ClipUpdate"]


@final
class ClipUpdate:
    """Scales the whole update so its L2 norm is at most the task's ``privacy.dp.clip_norm``."""

    name: str = "clip"
    produces: UpdateKind = UpdateKind.DELTA

    def __call__(self, update: ParamSet, context: UpdateContext) -> ParamSet:
        """Raises ValueError if the task's bound is not a positive number or the update is not finite."""
        bound = context.task_config.get(DP_CLIP_NORM_KEY)
        if bound is None:
            return update
        if isinstance(bound, bool) or not isinstance(bound, int | float):
            raise ValueError(f"task config {DP_CLIP_NORM_KEY} = {bound!r}: expected a positive number")
        clipped = clip_update(update, float(bound))
        if context.task_config.get(DP_ADAPTIVE_KEY) is not True:
            return clipped
        if DP_UNCLIPPED_TENSOR in update:
            raise ValueError(f"the update already holds a tensor named {DP_UNCLIPPED_TENSOR}")
        unclipped = update_norm(update) <= float(bound)
        return ParamSet([*clipped.items(), (DP_UNCLIPPED_TENSOR, np.array(float(unclipped), dtype=np.float32))])
