"""privacy.secure_aggregation: defaults, bounds, cloud aliases, and the combinations it refuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from enclavefl.config import parse_job
from enclavefl.errors import ConfigError
from enclavefl.messages import COMPRESSION_TYPE_KEY
from enclavefl.server.strategy import build_strategy
from enclavefl.tensors import ParamSet, StreamHeader

ON: dict[str, Any] = {"privacy": {"secure_aggregation": {"enabled": True}}, "round": {"min_workers": 3}}


def with_on(**sections: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"privacy": {"secure_aggregation": {"enabled": True}}, "round": {"min_workers": 3}}
    for name, section in sections.items():
        doc[name] = {**doc.get(name, {}), **section}
    return doc


def test_secure_aggregation_is_off_by_default_with_documented_defaults() -> None:
    s = parse_job({}).privacy.secure_aggregation
    assert (s.enabled, s.threshold, s.neighbours, s.quantization_bits, s.clip_range) == (False, 0.67, None, 16, 8.0)
    assert (s.weight_cap, s.stage_timeout_s, s.dense_fallback) == (256, 30.0, False)


def test_secure_aggregation_with_defaults_and_three_workers_is_accepted() -> None:
    assert parse_job(ON).privacy.secure_aggregation.enabled


@pytest.mark.parametrize("aggregator", ["krum", "median", "trimmed_mean"])
def test_buffering_aggregator_is_refused_naming_both_keys(aggregator: str) -> None:
    with pytest.raises(ConfigError, match=rf"privacy\.secure_aggregation\.enabled.*server\.aggregator mean, got {aggregator}"):
        parse_job(with_on(server={"aggregator": aggregator}))


def test_norm_bounded_aggregator_is_refused_naming_both_keys() -> None:
    doc = with_on(server={"aggregator": {"name": "norm_bounded", "max_norm": 1.0}})
    with pytest.raises(ConfigError, match=r"privacy\.secure_aggregation\.enabled.*got norm_bounded.*cannot"):
        parse_job(doc)


def test_async_rounds_are_refused_naming_both_keys() -> None:
    with pytest.raises(ConfigError, match=r"privacy\.secure_aggregation\.enabled.*round\.mode async"):
        parse_job(with_on(round={"mode": "async", "min_workers": 3}))


def test_scaffold_is_refused_naming_both_keys() -> None:
    with pytest.raises(ConfigError, match=r"privacy\.secure_aggregation\.enabled.*server\.strategy scaffold"):
        parse_job(with_on(server={"strategy": "scaffold"}))


def test_sparse_embedding_rows_are_refused_without_dense_fallback() -> None:
    doc = with_on(task={"name": "criteo-dlrm"})
    with pytest.raises(ConfigError, match=r"privacy\.secure_aggregation\.enabled.*task\.params\.sparse_gradients"
                                          r".*dense_fallback"):
        parse_job(doc)


def test_sparse_embedding_rows_with_dense_fallback_are_accepted() -> None:
    doc = with_on(task={"name": "criteo-dlrm"})
    doc["privacy"]["secure_aggregation"]["dense_fallback"] = True
    assert parse_job(doc).privacy.secure_aggregation.dense_fallback


def test_dlrm_without_sparse_gradients_is_accepted() -> None:
    assert parse_job(with_on(task={"name": "criteo-dlrm", "params": {"sparse_gradients": False}}))


def test_central_dp_composes_with_secure_aggregation() -> None:
    doc = with_on()
    doc["privacy"]["dp"] = {"enabled": True}
    config = parse_job(doc)
    assert config.privacy.dp.enabled and config.privacy.secure_aggregation.enabled


def test_fewer_than_three_min_workers_are_refused_naming_both_keys() -> None:
    with pytest.raises(ConfigError, match=r"privacy\.secure_aggregation\.enabled needs round\.min_workers >= 3"):
        parse_job({"privacy": {"secure_aggregation": {"enabled": True}}})


def test_total_weight_beyond_the_grid_is_refused_naming_the_keys() -> None:
    # 16 bits: L = 32767, capacity = (2**31 - 1) // 32767 = 65538; 300 workers * 256 = 76800 > 65538.
    doc = with_on(job={"workers": 300})
    with pytest.raises(ConfigError, match=r"job\.workers = 300.*weight_cap = 256 exceeds 65538.*quantization_bits"):
        parse_job(doc)


def test_threshold_count_above_min_workers_is_refused() -> None:
    doc = with_on()
    doc["privacy"]["secure_aggregation"]["threshold"] = 5
    with pytest.raises(ConfigError, match=r"threshold = 5 exceeds round\.min_workers = 3"):
        parse_job(doc)


def test_threshold_count_above_the_share_holders_is_refused() -> None:
    # neighbours 4 -> 4 holders plus the worker itself: a count of 6 could never be met.
    doc = with_on(round={"min_workers": 10}, job={"workers": 10})
    doc["privacy"]["secure_aggregation"].update(threshold=6, neighbours=4)
    with pytest.raises(ConfigError, match=r"threshold = 6 exceeds the 5 holders .*neighbours = 4"):
        parse_job(doc)


@pytest.mark.parametrize("value", [1, 0.5, 1.5, 0])
def test_threshold_out_of_range_is_refused_by_its_key(value: float) -> None:
    with pytest.raises(ConfigError, match=r"privacy\.secure_aggregation\.threshold"):
        parse_job({"privacy": {"secure_aggregation": {"threshold": value}}})


@pytest.mark.parametrize(("key", "value"), [("quantization_bits", 1), ("quantization_bits", 32), ("clip_range", 0.0),
                                            ("neighbours", 1), ("stage_timeout_s", 0), ("rounding", "up")])
def test_setting_out_of_range_is_refused_by_its_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"privacy\.secure_aggregation\.{key}"):
        parse_job({"privacy": {"secure_aggregation": {key: value}}})


def test_cloud_pw_encrypt_section_maps_to_secure_aggregation() -> None:
    doc = {"round": {"min_workers": 4}, "job": {"workers": 4},
           "encrypt": {"encrypt_type": "PW_ENCRYPT",
                       "pw_encrypt": {"share_secrets_ratio": 0.9, "cipher_time_window": 3000,
                                      "reconstruct_secrets_threshold": 3}}}
    s = parse_job(doc).privacy.secure_aggregation
    assert (s.enabled, s.min_share_ratio, s.stage_timeout_s, s.threshold) == (True, 0.9, 3.0, 3)


def test_cloud_stable_pw_encrypt_and_top_level_aliases() -> None:
    doc = {"round": {"min_workers": 3}, "encrypt": {"encrypt_type": "STABLE_PW_ENCRYPT"}, "cipher_time_window": 500}
    s = parse_job(doc).privacy.secure_aggregation
    assert (s.enabled, s.stage_timeout_s) == (True, 0.5)


def test_cloud_encrypt_type_can_be_set_on_the_command_line() -> None:
    config = parse_job({"round": {"min_workers": 3}}, overrides=["encrypt.encrypt_type=PW_ENCRYPT"])
    assert config.privacy.secure_aggregation.enabled


def test_unknown_cloud_encrypt_type_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"encrypt\.encrypt_type = 'XOR': not supported here \(accepted: NOT_ENCRYPT, PW_ENCRYPT, "
                                          r"STABLE_PW_ENCRYPT"):
        parse_job({"encrypt": {"encrypt_type": "XOR"}})


def test_not_encrypt_leaves_secure_aggregation_off() -> None:
    assert not parse_job({"encrypt": {"encrypt_type": "NOT_ENCRYPT"}}).privacy.secure_aggregation.enabled


def _with_upload(kind: str, *, dense_fallback: bool = False) -> dict[str, Any]:
    doc = with_on()
    doc["privacy"]["compression"] = {"upload": {"type": kind}}
    doc["privacy"]["secure_aggregation"]["dense_fallback"] = dense_fallback
    return doc


def test_upload_quantization_is_refused_naming_both_keys() -> None:
    with pytest.raises(ConfigError, match=r"privacy\.secure_aggregation\.enabled.*privacy\.compression\.upload\.type "
                                          r"quantize.*quantization_bits"):
        parse_job(_with_upload("quantize"))


@pytest.mark.parametrize("kind", ["topk", "topk_quantize"])
def test_upload_top_k_is_refused_without_dense_fallback(kind: str) -> None:
    with pytest.raises(ConfigError, match=rf"privacy\.secure_aggregation\.enabled.*privacy\.compression\.upload\.type "
                                          rf"{kind}.*masks destroy sparsity.*dense_fallback"):
        parse_job(_with_upload(kind))


def test_upload_top_k_with_dense_fallback_sends_dense_masked_updates(tmp_path: Path) -> None:
    config = parse_job(_with_upload("topk", dense_fallback=True))
    model = StreamHeader.of(ParamSet({"w": np.zeros(4, np.float32)}))
    strategy = build_strategy(config, model, spill_dir=tmp_path)
    assert COMPRESSION_TYPE_KEY not in strategy.task_config


def test_quantized_downloads_compose_with_secure_aggregation() -> None:
    doc = with_on()
    doc["privacy"]["compression"] = {"download": {"type": "quantize"}}
    assert parse_job(doc).privacy.compression.download.type == "quantize"
