"""privacy.compression.upload: defaults, bounds, the cloud cluster's keys, and what it composes with."""

from __future__ import annotations

from typing import Any

import pytest

from enclavefl.config import CLOUD_SECTION_ALIASES, JobConfig, parse_job
from enclavefl.errors import ConfigError


def upload(**settings: Any) -> dict[str, Any]:
    return {"privacy": {"compression": {"upload": settings}}}


def test_compression_is_off_by_default_with_documented_defaults() -> None:
    up = parse_job({}).privacy.compression.upload
    assert (up.type, up.bits, up.sparse_rate) == ("none", 8, 0.01)


@pytest.mark.parametrize(("key", "value"), [("type", "gzip"), ("bits", 2), ("bits", True), ("sparse_rate", 0.0),
                                            ("sparse_rate", 1.0)])
def test_setting_out_of_range_is_refused_by_its_key(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"privacy\.compression\.upload\.{key}"):
        parse_job(upload(**{"type": "topk", key: value}))


@pytest.mark.parametrize("kind", ["topk", "topk_quantize"])
def test_topk_with_scaffold_is_refused_naming_both_keys(kind: str) -> None:
    with pytest.raises(ConfigError, match=rf"privacy\.compression\.upload\.type {kind}.*server\.strategy scaffold"):
        parse_job({**upload(type=kind), "server": {"strategy": {"name": "scaffold"}}})


def test_quantize_with_scaffold_is_accepted() -> None:
    config = parse_job({**upload(type="quantize"), "server": {"strategy": {"name": "scaffold"}}})
    assert config.privacy.compression.upload.type == "quantize"


@pytest.mark.parametrize("other", [
    {"server": {"aggregator": {"name": "krum"}}},          # robust aggregators see decoded updates
    {"server": {"aggregator": {"name": "median"}}},
    {"round": {"mode": "async"}},                          # a worker's residual does not depend on rounds
    {"privacy": {"dp": {"enabled": True}}},                # clip, compress, bound the decoded norm
    {"task": {"name": "criteo-dlrm"}},                     # embedding rows travel as they are
])
def test_topk_quantize_composes_with(other: dict[str, Any]) -> None:
    doc: dict[str, Any] = upload(type="topk_quantize")
    for section, values in other.items():
        doc.setdefault(section, {}).update(values)
    assert parse_job(doc).privacy.compression.upload.type == "topk_quantize"


def test_cloud_diff_sparse_quant_means_topk_quantize_at_its_rate() -> None:
    config = parse_job({"compression": {"upload_compress_type": "DIFF_SPARSE_QUANT", "upload_sparse_rate": 0.05}})
    up = config.privacy.compression.upload
    assert (up.type, up.bits, up.sparse_rate) == ("topk_quantize", 8, 0.05)


def test_cloud_compression_key_works_with_set() -> None:
    config = parse_job({}, overrides=["compression.upload_compress_type=NO_COMPRESS"])
    assert config.privacy.compression.upload.type == "none"


def test_cloud_compression_value_it_does_not_know_is_refused_naming_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"compression\.upload_compress_type = 'ZIP'.*DIFF_SPARSE_QUANT"):
        parse_job({"compression": {"upload_compress_type": "ZIP"}})


def test_cloud_compression_key_it_does_not_know_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"compression\.upload_level is not a cloud cluster key"):
        parse_job({"compression": {"upload_level": 3}})


def test_every_cloud_section_alias_targets_an_existing_key() -> None:
    defaults = JobConfig().to_dict()
    for alias, (dotted, _values) in CLOUD_SECTION_ALIASES.items():
        node = defaults
        for part in dotted.split(".")[:-1]:
            node = node[part]
        assert dotted.split(".")[-1] in node, alias
