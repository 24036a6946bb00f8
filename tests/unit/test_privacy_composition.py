"""Rules between privacy options that were built separately: each refusal names both keys and why.

The rules of one option against the rest of the job live with that option's config
tests (test_secagg_config, test_compression_config, test_privacy_config,
test_download_config); these are the pairs of two privacy options.
"""

from __future__ import annotations

from typing import Any

import pytest

from enclavefl.config import parse_job
from enclavefl.errors import ConfigError

SECAGG: dict[str, Any] = {"enabled": True}


def job(privacy: dict[str, Any]) -> dict[str, Any]:
    return {"privacy": privacy, "round": {"min_workers": 3, "min_updates": 3}, "job": {"workers": 3}}


def test_secure_aggregation_refuses_signds_naming_both_keys() -> None:
    doc = job({"secure_aggregation": SECAGG, "local_dp": {"enabled": True, "mechanism": "signds"}})
    with pytest.raises(ConfigError, match=r"privacy\.secure_aggregation\.enabled.*privacy\.local_dp\.mechanism "
                                          r"signds.*indices"):
        parse_job(doc)


def test_secure_aggregation_composes_with_gaussian_local_dp() -> None:
    doc = job({"secure_aggregation": SECAGG, "local_dp": {"enabled": True, "mechanism": "gaussian"}})
    assert parse_job(doc).privacy.local_dp.enabled


def test_secure_aggregation_refuses_adaptive_clipping_naming_both_keys() -> None:
    adaptive = {"enabled": True, "clipped_count_stddev": 5.0}
    doc = job({"secure_aggregation": SECAGG, "dp": {"enabled": True, "adaptive_clipping": adaptive}})
    with pytest.raises(ConfigError, match=r"privacy\.secure_aggregation\.enabled.*"
                                          r"privacy\.dp\.adaptive_clipping\.enabled"):
        parse_job(doc)


@pytest.mark.parametrize("mode", ["central", "distributed"])
def test_secure_aggregation_composes_with_dp(mode: str) -> None:
    doc = job({"secure_aggregation": SECAGG, "dp": {"enabled": True, "mode": mode}})
    assert parse_job(doc).privacy.dp.mode == mode


@pytest.mark.parametrize("kind", ["quantize", "topk", "topk_quantize"])
def test_signds_refuses_upload_compression_naming_both_keys(kind: str) -> None:
    doc = job({"local_dp": {"enabled": True, "mechanism": "signds"}, "compression": {"upload": {"type": kind}}})
    with pytest.raises(ConfigError, match=rf"privacy\.local_dp\.mechanism signds.*privacy\.compression\.upload\.type "
                                          rf"{kind}"):
        parse_job(doc)


@pytest.mark.parametrize("kind", ["quantize", "topk_quantize"])
def test_gaussian_local_dp_composes_with_upload_compression(kind: str) -> None:
    doc = job({"local_dp": {"enabled": True, "mechanism": "gaussian"}, "compression": {"upload": {"type": kind}}})
    assert parse_job(doc).privacy.compression.upload.type == kind


def test_secure_aggregation_composes_with_sparse_downloads() -> None:
    doc = job({"secure_aggregation": SECAGG})
    doc["transport"] = {"sparse_downloads": {"enabled": True}}
    assert parse_job(doc).transport.sparse_downloads.enabled
