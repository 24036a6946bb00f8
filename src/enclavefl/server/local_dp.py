"""Local differential privacy on the PS: the settings workers need, and what each upload spends.

With ``privacy.local_dp`` every worker privatises its own upload
(:mod:`enclavefl.worker.noise`), so the PS needs no trust: it sends the
mechanism's parameters with every train task, and every metrics row reports
``local_dp_epsilon_round`` (what one upload spends) and ``local_dp_epsilon``,
the composition over the rounds so far at ``local_dp_delta``: an upper bound
for every worker, since a worker uploads at most once per round.

- ``gaussian``: each upload is the analytic Gaussian mechanism (Balle and Wang
  2018) at (``epsilon``, ``delta``); its noise multiplier is
  ``sigma / (2 clip_norm)``, and R uploads compose, with privacy loss
  distributions in Google's ``dp-accounting``, as R Gaussian mechanisms.
- ``signds``: each upload is ``epsilon``-DP (pure; Jiang et al. 2022); R of them
  compose as R epsilon-DP mechanisms (the PLD of a pure mechanism's worst case).

The count of rounds is the ``local_dp`` checkpoint part, restored on ``--resume``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from enclavefl.config import LocalDpConfig
from enclavefl.errors import CheckpointError, ConfigError
from enclavefl.gaussian_mechanism import analytic_gaussian_sigma
from enclavefl.messages import (
    LOCAL_DP_CLIP_NORM_KEY,
    LOCAL_DP_DELTA_KEY,
    LOCAL_DP_DIMS_OUT_KEY,
    LOCAL_DP_EPSILON_KEY,
    LOCAL_DP_MECHANISM_KEY,
    LOCAL_DP_THRESHOLD_RATIO_KEY,
    LOCAL_DP_TOP_K_KEY,
    ConfigValue,
)
from enclavefl.server.algorithms import CloseContext
from enclavefl.server.state import PartState
from enclavefl.server.signds import float_values
from enclavefl.signds import signds_dims_out, signds_top_k
from enclavefl.tensors import ParamSet, StreamHeader

__all__ = ["LocalDpRelease", "composed_epsilon"]


def _library() -> Any:
    try:
        return importlib.import_module("dp_accounting")
    except ImportError as exc:
        raise ConfigError("privacy.local_dp.enabled needs the dp-accounting library: "
                          "pip install 'enclavefl[privacy]'") from exc


def composed_epsilon(config: LocalDpConfig, rounds: int, *, sigma: float | None = None) -> float:
    """Epsilon at ``config.delta`` of ``rounds`` uploads of one worker (0 for none).

    Args:
        sigma: the Gaussian noise std (``gaussian``); computed from ``config`` when None.
    """
    if rounds <= 0:
        return 0.0
    dp = _library()
    if config.mechanism == "gaussian":
        std = sigma if sigma is not None else analytic_gaussian_sigma(config.epsilon, config.delta,
                                                                      2 * config.clip_norm)
        accountant = dp.pld.PLDAccountant()
        accountant.compose(dp.GaussianDpEvent(std / (2 * config.clip_norm)), rounds)
        return float(accountant.get_epsilon(config.delta))
    pld = importlib.import_module("dp_accounting.pld.privacy_loss_distribution")
    common = importlib.import_module("dp_accounting.pld.common")
    one = pld.from_privacy_parameters(common.DifferentialPrivacyParameters(config.epsilon, 0.0))
    return float(min(rounds * config.epsilon, one.self_compose(rounds).get_epsilon_for_delta(config.delta)))


class LocalDpRelease:
    """Local DP's server side: the task settings, a post-process step that counts rounds, the metrics.

    Raises:
        ConfigError: the ``dp-accounting`` library is missing, or (SignDS) the model has too few
            floating-point values to select among.
    """

    def __init__(self, config: LocalDpConfig, model: StreamHeader) -> None:
        _library()
        self.config = config
        self.rounds = 0
        self.sigma = 0.0
        self.top_k = 0
        self.dims_out = 0
        settings: dict[str, ConfigValue] = {LOCAL_DP_MECHANISM_KEY: config.mechanism,
                                            LOCAL_DP_EPSILON_KEY: config.epsilon}
        if config.mechanism == "gaussian":
            self.sigma = analytic_gaussian_sigma(config.epsilon, config.delta, 2 * config.clip_norm)
            settings.update({LOCAL_DP_DELTA_KEY: config.delta, LOCAL_DP_CLIP_NORM_KEY: config.clip_norm})
        else:
            d = float_values(model)
            try:
                self.top_k = signds_top_k(d, config.sparse_rate)
            except ValueError as exc:
                raise ConfigError(f"privacy.local_dp.mechanism signds: {exc}") from exc
            self.dims_out = signds_dims_out(d, self.top_k, config.epsilon, config.threshold_ratio, config.dims_out)
            settings.update({LOCAL_DP_TOP_K_KEY: self.top_k, LOCAL_DP_DIMS_OUT_KEY: self.dims_out,
                             LOCAL_DP_THRESHOLD_RATIO_KEY: config.threshold_ratio})
        self.task_config: Mapping[str, ConfigValue] = settings
        self._epsilon: tuple[int, float] = (0, 0.0)

    def post_process(self, aggregate: ParamSet, context: CloseContext) -> ParamSet:
        """Counts the round's uploads as released; the aggregate passes unchanged (post-processing is free)."""
        self.rounds += 1
        return aggregate

    def epsilon(self) -> float:
        """The composed epsilon over the rounds so far (cached per count)."""
        if self._epsilon[0] != self.rounds:
            self._epsilon = (self.rounds, composed_epsilon(self.config, self.rounds, sigma=self.sigma or None))
        return self._epsilon[1]

    def row(self) -> Mapping[str, float]:
        """``local_dp_epsilon_round``, ``local_dp_epsilon`` (composed) and ``local_dp_delta`` for a metrics row."""
        return {"local_dp_epsilon_round": self.config.epsilon, "local_dp_epsilon": self.epsilon(),
                "local_dp_delta": self.config.delta}

    def state(self) -> PartState:
        return PartState({"mechanism": self.config.mechanism, "epsilon": self.config.epsilon, "rounds": self.rounds})

    def load_state(self, state: PartState) -> None:
        """Restores the count of released rounds.

        Raises:
            CheckpointError: the state is malformed or was kept for another mechanism or epsilon.
        """
        meta = state.meta
        rounds = meta.get("rounds")
        if meta.get("mechanism") != self.config.mechanism or meta.get("epsilon") != self.config.epsilon:
            raise CheckpointError(f"the checkpoint's local DP is {meta.get('mechanism')!r} at epsilon="
                                  f"{meta.get('epsilon')!r}, this job's is {self.config.mechanism!r} at "
                                  f"epsilon={self.config.epsilon!r}")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise CheckpointError(f"local_dp rounds: expected a count, got {rounds!r}")
        self.rounds = rounds
