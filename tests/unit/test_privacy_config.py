"""The privacy section: defaults, bounds, and the combinations DP-FedAvg refuses (each naming both keys)."""

from __future__ import annotations

import pytest

from enclavefl.config import parse_job
from enclavefl.errors import ConfigError

DP_ON = {"privacy": {"dp": {"enabled": True}}}


def test_dp_is_off_by_default_with_documented_defaults() -> None:
    dp = parse_job({}).privacy.dp
    assert (dp.enabled, dp.delta, dp.accountant, dp.target_epsilon) == (False, 1e-5, "rdp", None)


def test_dp_with_a_robust_aggregator_is_refused_naming_both_keys() -> None:
    with pytest.raises(ConfigError, match=r"privacy\.dp\.enabled.*server\.aggregator mean, got krum"):
        parse_job({**DP_ON, "server": {"aggregator": {"name": "krum"}}})


def test_dp_with_async_rounds_is_refused_naming_both_keys() -> None:
    with pytest.raises(ConfigError, match=r"privacy\.dp\.enabled.*round\.mode async"):
        parse_job({**DP_ON, "round": {"mode": "async"}})


def test_dp_with_scaffold_is_refused_naming_both_keys() -> None:
    with pytest.raises(ConfigError, match=r"privacy\.dp\.enabled.*server\.strategy scaffold"):
        parse_job({**DP_ON, "server": {"strategy": {"name": "scaffold"}}})


def test_robust_aggregator_without_dp_is_accepted() -> None:
    assert parse_job({"server": {"aggregator": {"name": "krum"}}}).server.aggregator.name == "krum"


@pytest.mark.parametrize(("key", "value"), [("clip_norm", 0.0), ("noise_multiplier", -1.0), ("delta", 1.0),
                                            ("delta", 0.0), ("target_epsilon", 0.0), ("accountant", "gdp")])
def test_dp_setting_out_of_range_is_refused_by_its_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"privacy\.dp\.{key}"):
        parse_job({"privacy": {"dp": {"enabled": True, key: value}}})
