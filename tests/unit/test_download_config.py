"""Download settings: defaults, the cloud cluster's alias, and the combination that is refused."""

from __future__ import annotations

import pytest

from enclavefl.config import parse_job
from enclavefl.errors import ConfigError


def test_downloads_are_dense_and_full_precision_by_default() -> None:
    config = parse_job({})
    assert config.privacy.compression.download.type == "none"
    assert config.transport.sparse_downloads.enabled is False


def test_cloud_download_compress_type_quant_means_quantize() -> None:
    assert parse_job({"compression": {"download_compress_type": "QUANT"}}).privacy.compression.download.type == "quantize"


def test_cloud_download_compress_type_no_compress_means_none() -> None:
    assert parse_job({"compression": {"download_compress_type": "NO_COMPRESS"}}).privacy.compression.download.type == "none"


def test_an_unknown_cloud_download_compress_type_is_refused_by_its_key() -> None:
    with pytest.raises(ConfigError, match="download_compress_type"):
        parse_job({"compression": {"download_compress_type": "DIFF_SPARSE_QUANT"}})


def test_download_bits_other_than_8_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"privacy\.compression\.download\.bits"):
        parse_job({"privacy": {"compression": {"download": {"type": "quantize", "bits": 4}}}})


def test_quantized_downloads_with_sparse_downloads_are_refused_naming_both_keys() -> None:
    doc = {"privacy": {"compression": {"download": {"type": "quantize"}}},
           "transport": {"sparse_downloads": {"enabled": True}}}
    with pytest.raises(ConfigError, match=r"privacy\.compression\.download\.type.*transport\.sparse_downloads\.enabled"):
        parse_job(doc)


@pytest.mark.parametrize(("key", "value"), [("max_behind_versions", 0), ("max_diff_fraction", 0.0),
                                            ("max_diff_fraction", 1.5)])
def test_sparse_download_setting_out_of_range_is_refused_by_its_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"transport\.sparse_downloads\.{key}"):
        parse_job({"transport": {"sparse_downloads": {"enabled": True, key: value}}})
