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


# ------------------------------------------------------------------ DP modes and adaptive clipping

def adaptive_dp(**adaptive: object) -> dict[str, object]:
    return {"privacy": {"dp": {"enabled": True, "adaptive_clipping": {"enabled": True, **adaptive}}}}


def test_dp_mode_is_central_and_adaptive_clipping_off_by_default() -> None:
    dp = parse_job({}).privacy.dp
    adaptive = dp.adaptive_clipping
    assert (dp.mode, adaptive.enabled, adaptive.target_quantile, adaptive.learning_rate) == ("central", False, 0.5, 0.2)


def test_distributed_dp_with_min_updates_one_is_refused_naming_both_keys() -> None:
    with pytest.raises(ConfigError, match=r"privacy\.dp\.mode distributed.*round\.min_updates"):
        parse_job({"privacy": {"dp": {"enabled": True, "mode": "distributed"}}})


def test_distributed_dp_with_min_updates_is_accepted() -> None:
    config = parse_job({"job": {"workers": 4}, "round": {"min_updates": 3},
                        "privacy": {"dp": {"enabled": True, "mode": "distributed"}}})
    assert config.privacy.dp.mode == "distributed"


def test_adaptive_clipping_in_distributed_mode_is_refused_naming_both_keys() -> None:
    doc = adaptive_dp(clipped_count_stddev=1.0)
    doc["privacy"]["dp"]["mode"] = "distributed"  # type: ignore[index]
    with pytest.raises(ConfigError, match=r"privacy\.dp\.adaptive_clipping\.enabled.*privacy\.dp\.mode central"):
        parse_job({"job": {"workers": 4}, "round": {"min_updates": 2}, **doc})


def test_adaptive_clipping_with_noise_needs_the_count_noise_naming_both_keys() -> None:
    with pytest.raises(ConfigError, match=r"clipped_count_stddev when privacy\.dp\.noise_multiplier"):
        parse_job(adaptive_dp())


def test_adaptive_clipping_count_noise_at_most_half_z_is_refused_naming_both_keys() -> None:
    with pytest.raises(ConfigError, match=r"clipped_count_stddev = 0\.5 must exceed half of privacy\.dp\.noise_mult"):
        parse_job(adaptive_dp(clipped_count_stddev=0.5))


def test_adaptive_clipping_without_noise_needs_no_count_noise() -> None:
    doc = adaptive_dp()
    doc["privacy"]["dp"]["noise_multiplier"] = 0.0  # type: ignore[index]
    assert parse_job(doc).privacy.dp.adaptive_clipping.enabled


def test_adaptive_clipping_composes_with_the_pld_accountant() -> None:
    doc = adaptive_dp(clipped_count_stddev=1.0)
    doc["privacy"]["dp"]["accountant"] = "pld"  # type: ignore[index]
    assert parse_job(doc).privacy.dp.accountant == "pld"


@pytest.mark.parametrize(("key", "value"), [("target_quantile", 1.0), ("learning_rate", 0.0),
                                            ("clipped_count_stddev", 0.0)])
def test_adaptive_clipping_setting_out_of_range_is_refused_by_its_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"privacy\.dp\.adaptive_clipping\.{key}"):
        parse_job(adaptive_dp(**{key: value}))


# ------------------------------------------------------------------ local DP

LOCAL_ON = {"privacy": {"local_dp": {"enabled": True}}}
SIGNDS_ON = {"privacy": {"local_dp": {"enabled": True, "mechanism": "signds"}}}


def test_local_dp_is_off_by_default_with_documented_defaults() -> None:
    local = parse_job({}).privacy.local_dp
    assert (local.enabled, local.mechanism, local.epsilon, local.delta, local.clip_norm) == (
        False, "gaussian", 1.0, 1e-5, 1.0)
    assert (local.sparse_rate, local.threshold_ratio, local.global_lr, local.dims_out) == (0.01, 0.6, 1.0, 0)


def test_local_dp_with_central_dp_is_refused_naming_both_keys() -> None:
    with pytest.raises(ConfigError, match=r"privacy\.local_dp\.enabled and privacy\.dp\.enabled are exclusive"):
        parse_job({"privacy": {"dp": {"enabled": True}, "local_dp": {"enabled": True}}})


def test_local_dp_with_scaffold_is_refused_naming_both_keys() -> None:
    with pytest.raises(ConfigError, match=r"privacy\.local_dp\.enabled.*server\.strategy scaffold"):
        parse_job({**LOCAL_ON, "server": {"strategy": "scaffold"}})


def test_local_dp_with_async_rounds_is_refused_naming_both_keys() -> None:
    with pytest.raises(ConfigError, match=r"privacy\.local_dp\.enabled.*round\.mode async"):
        parse_job({**LOCAL_ON, "round": {"mode": "async"}})


def test_signds_with_a_robust_aggregator_is_refused_naming_both_keys() -> None:
    with pytest.raises(ConfigError, match=r"privacy\.local_dp\.mechanism signds.*server\.aggregator mean, got median"):
        parse_job({**SIGNDS_ON, "server": {"aggregator": "median"}})


def test_gaussian_local_dp_with_a_robust_aggregator_is_accepted() -> None:
    # Post-processing of private uploads: the median of noised updates is as private as they are.
    config = parse_job({**LOCAL_ON, "server": {"aggregator": "median"}})
    assert config.server.aggregator.name == "median"


@pytest.mark.parametrize(("key", "value"), [("epsilon", 0.0), ("delta", 1.0), ("clip_norm", 0.0),
                                            ("sparse_rate", 0.3), ("threshold_ratio", 0.4), ("dims_out", 51),
                                            ("mechanism", "laplace")])
def test_local_dp_setting_out_of_range_is_refused_by_its_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"privacy\.local_dp\.{key}"):
        parse_job({"privacy": {"local_dp": {"enabled": True, key: value}}})


# ------------------------------------------------------------------ the cloud cluster's encrypt section

def test_dp_encrypt_means_gaussian_local_dp_with_its_parameters() -> None:
    local = parse_job({"encrypt": {"encrypt_type": "DP_ENCRYPT", "dp_eps": 50.0, "dp_delta": 0.01,
                                   "dp_norm_clip": 2.0}}).privacy.local_dp
    assert (local.enabled, local.mechanism, local.epsilon, local.delta, local.clip_norm) == (
        True, "gaussian", 50.0, 0.01, 2.0)


def test_signds_means_signds_local_dp_with_its_parameters_in_their_sub_section() -> None:
    local = parse_job({"encrypt": {"encrypt_train_type": "SIGNDS", "signds": {
        "sign_k": 0.2, "sign_eps": 100, "sign_thr_ratio": 0.7, "sign_global_lr": 4, "sign_dim_out": 5}}}).privacy.local_dp
    assert (local.enabled, local.mechanism, local.sparse_rate, local.epsilon, local.threshold_ratio, local.global_lr,
            local.dims_out) == (True, "signds", 0.2, 100.0, 0.7, 4.0, 5)


def test_not_encrypt_leaves_privacy_off() -> None:
    assert not parse_job({"encrypt": {"encrypt_type": "NOT_ENCRYPT"}}).privacy.local_dp.enabled


def test_encrypt_type_is_accepted_with_set() -> None:
    config = parse_job({}, overrides=["encrypt.encrypt_type=DP_ENCRYPT", "encrypt.dp_eps=3"])
    assert (config.privacy.local_dp.enabled, config.privacy.local_dp.epsilon) == (True, 3.0)


def test_unknown_encrypt_type_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"encrypt\.encrypt_type = 'HE_ENCRYPT': not supported here"):
        parse_job({"encrypt": {"encrypt_type": "HE_ENCRYPT"}})


def test_parameter_of_another_encrypt_type_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"sign_eps apply to encrypt_type SIGNDS, but the encrypt_type is DP_ENCRYPT"):
        parse_job({"encrypt": {"encrypt_type": "DP_ENCRYPT", "sign_eps": 1.0}})


def test_unknown_encrypt_key_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"encrypt\.dp_encrypt\.dp_sigma: unknown key"):
        parse_job({"encrypt": {"encrypt_type": "DP_ENCRYPT", "dp_encrypt": {"dp_sigma": 1.0}}})


def test_encrypt_parameter_out_of_range_is_refused_by_our_key() -> None:
    with pytest.raises(ConfigError, match=r"privacy\.local_dp\.sparse_rate"):
        parse_job({"encrypt": {"encrypt_type": "SIGNDS", "sign_k": 0.5}})


@pytest.mark.parametrize("section", [{"dp": {"enabled": True, "target_epsilon": True}},
                                     {"dp": {"enabled": True, "noise_multiplier": 0.0,
                                             "adaptive_clipping": {"enabled": True, "clipped_count_stddev": True}}}])
def test_optional_number_given_as_a_boolean_is_refused(section: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="expected a number, got a boolean"):
        parse_job({"privacy": section})
