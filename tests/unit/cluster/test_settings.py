"""Tests for the job file's cluster section and enclavefl.cluster.settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from enclavefl.cluster.redis_store import RedisSettings
from enclavefl.cluster.settings import check_cluster_job, redis_settings, redis_settings_from_url
from enclavefl.config import parse_job
from enclavefl.errors import ConfigError


def test_the_cluster_section_defaults_when_the_job_file_has_none() -> None:
    config = parse_job({"job": {"name": "j"}})

    assert (config.cluster.servers, config.cluster.redis.port, config.cluster.redis.tls) == (2, 6379, False)


def test_a_member_ttl_shorter_than_two_heartbeats_is_refused() -> None:
    with pytest.raises(ConfigError, match="member_ttl_s=1.5 must be at least twice cluster.heartbeat_s=1"):
        parse_job({"cluster": {"heartbeat_s": 1.0, "member_ttl_s": 1.5}})


def test_an_unknown_redis_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="cluster.redis.password"):
        parse_job({"cluster": {"redis": {"password": "in-the-job-file"}}})


def test_redis_settings_resolve_paths_against_the_job_directory(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "redis.pass").write_text("s3cret\n", encoding="utf-8")
    config = parse_job({"cluster": {"redis": {"host": "redis.local", "port": 6380, "tls": True, "ca_cert": "ca.pem",
                                              "username": "efl", "password_file": "redis.pass"}}})

    # Execute
    settings = redis_settings(config.cluster.redis, base_dir=tmp_path)

    # Assert
    assert (settings.host, settings.port, settings.tls, settings.username) == ("redis.local", 6380, True, "efl")
    assert settings.password == "s3cret"
    assert settings.ca_file == str(tmp_path / "ca.pem")
    assert "s3cret" not in repr(settings)


def test_an_empty_password_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("", encoding="utf-8")
    config = parse_job({"cluster": {"redis": {"password_file": "empty"}}})

    with pytest.raises(ConfigError, match="password_file .*empty"):
        redis_settings(config.cluster.redis, base_dir=tmp_path)


def test_a_store_url_overrides_host_port_db_and_tls() -> None:
    settings = redis_settings_from_url("rediss://10.0.0.5:7000/3", base=RedisSettings(password="p", retries=2))

    assert (settings.host, settings.port, settings.db, settings.tls) == ("10.0.0.5", 7000, 3, True)
    assert (settings.password, settings.retries) == ("p", 2)


@pytest.mark.parametrize(("url", "reason"), [
    ("http://h:1/0", "expected redis://"),
    ("redis://u:pw@h:1/0", "password in the URL"),
    ("redis://h:1/99", "database must be 0..15"),
])
def test_a_bad_store_url_is_refused(url: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        redis_settings_from_url(url)


@pytest.mark.parametrize(("doc", "key"), [
    ({"server": {"aggregator": {"name": "median"}}}, "server.aggregator"),
    ({"round": {"mode": "async"}}, "round.mode"),
    ({"privacy": {"secure_aggregation": {"enabled": True}}}, "privacy.secure_aggregation.enabled"),
])
def test_a_job_the_cluster_cannot_split_is_refused_naming_the_key(doc: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        check_cluster_job(parse_job(doc))


def test_a_fedavg_job_runs_in_a_cluster() -> None:
    check_cluster_job(parse_job({"server": {"optimizer": {"name": "fedadam"}}}))


@pytest.mark.parametrize("mode", ["central", "distributed"])
def test_a_dp_job_runs_in_a_cluster(mode: str) -> None:
    check_cluster_job(parse_job({"round": {"min_updates": 2, "min_workers": 2},
                                 "privacy": {"dp": {"enabled": True, "clip_norm": 1.0, "noise_multiplier": 1.0,
                                                    "mode": mode}}}))


def test_a_written_cluster_key_reads_back_and_only_its_owner_may_read_it(tmp_path: Path) -> None:
    from enclavefl.cluster.settings import read_cluster_key, write_cluster_key

    key = write_cluster_key(tmp_path / "cluster.key")

    assert read_cluster_key(tmp_path / "cluster.key") == key and len(key) == 32
    assert (tmp_path / "cluster.key").stat().st_mode & 0o777 == 0o600


def test_a_short_cluster_key_is_refused_without_showing_it(tmp_path: Path) -> None:
    from enclavefl.cluster.settings import read_cluster_key

    (tmp_path / "k").write_text("abcd1234", encoding="ascii")

    with pytest.raises(ConfigError, match="expected 64 hex digits") as info:
        read_cluster_key(tmp_path / "k")
    assert "abcd1234" not in str(info.value)
