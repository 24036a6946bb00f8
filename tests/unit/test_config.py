"""Tests for enclavefl.config: job files, --set overrides and cloud FL aliases."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from enclavefl.config import (
    CLOUD_KEY_ALIASES,
    JobConfig,
    RoundConfig,
    apply_overrides,
    check_worker_count,
    load_job,
    override_key,
    parse_job,
)
from enclavefl.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("**/*.yaml"))


def config_error(doc: Any, overrides: list[str] | None = None) -> str:
    """The message of the ConfigError that parsing `doc` raises."""
    with pytest.raises(ConfigError) as info:
        parse_job(doc, source="job.yaml", overrides=overrides or [])
    return str(info.value)


# ------------------------------------------------------------------ defaults


def test_empty_document_gives_secure_defaults() -> None:
    # Execute
    config = parse_job(None)

    # Assert
    assert config == JobConfig()
    assert config.job.rounds == 10
    assert config.attestation.mode == "simulated"  # attestation on unless the job says none
    assert config.round.min_workers == 1
    assert config.transport.listen == "127.0.0.1:0"


def test_to_dict_round_trips_through_parse_job() -> None:
    config = parse_job({"job": {"rounds": 4}, "task": {"params": {"hidden": [8]}}})

    assert parse_job(config.to_dict()) == config


def test_config_is_frozen() -> None:
    config = parse_job({})

    with pytest.raises(ValueError):
        config.job.rounds = 3


# ------------------------------------------------------------------ rejections


def test_rejects_unknown_key_naming_the_file_and_the_dotted_path() -> None:
    message = config_error({"transport": {"tls": {"bogus": 17}}})

    assert message.startswith("job.yaml: transport.tls.bogus: unknown key")


def test_unknown_key_suggests_the_closest_and_lists_the_valid_keys() -> None:
    message = config_error({"round": {"min_worker": 3}})

    valid = ", ".join(sorted(RoundConfig.model_fields))
    assert message == f"job.yaml: round.min_worker: unknown key; did you mean min_workers? (valid: {valid})"


def test_unknown_key_without_a_close_one_lists_the_valid_keys_only() -> None:
    message = config_error({"client": {"zzz": 1}})

    assert "client.zzz: unknown key (valid: batch_size, epochs, lr, momentum, optimizer, weight_decay)" in message
    assert "did you mean" not in message


def test_unknown_key_inside_a_tagged_variant_lists_that_variants_keys() -> None:
    message = config_error({"server": {"optimizer": {"name": "fedadam", "bet1": 0.9}}})

    assert "server.optimizer.bet1: unknown key; did you mean beta1? (valid: beta1, beta2, name, tau)" in message


def test_unknown_top_level_key_suggests_a_cloud_alias() -> None:
    message = config_error({"fl_iteration_nun": 3})

    assert "fl_iteration_nun: unknown key; did you mean fl_iteration_num?" in message


def test_rejects_unknown_section() -> None:
    message = config_error({"sever": {"lr": 1.0}})

    assert "sever: unknown key" in message


def test_rejects_wrong_type_naming_path_value_and_expected_type() -> None:
    message = config_error({"job": {"rounds": "many"}})

    assert "job.rounds = 'many'" in message
    assert "valid integer" in message


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("job", "rounds", True),
        ("round", "start_window_s", True),
        ("client", "batch_size", True),
        ("round", "fraction", True),
    ],
)
def test_rejects_boolean_where_a_number_is_expected(section: str, key: str, value: bool) -> None:
    # YAML reads `yes`/`on`/`true` as booleans; `rounds: yes` must not mean one round.
    message = config_error({section: {key: value}})

    assert f"{section}.{key} = {value!r}" in message


@pytest.mark.parametrize(
    ("doc", "path", "allowed"),
    [
        ({"job": {"rounds": 0}}, "job.rounds = 0", "must be >= 1"),
        ({"round": {"fraction": 1.5}}, "round.fraction = 1.5", "must be <= 1"),
        ({"round": {"update_window_s": -1}}, "round.update_window_s = -1", "must be > 0"),
        ({"transport": {"chunk_bytes": 10}}, "transport.chunk_bytes = 10", "must be >= 4096"),
        ({"client": {"optimizer": "rmsprop"}}, "client.optimizer = 'rmsprop'", "must be one of 'sgd' or 'adam'"),
        ({"attestation": {"mode": "off"}}, "attestation.mode = 'off'", "must be one of"),
        ({"task": {"name": "a:b:c"}}, "task.name = 'a:b:c'", "package.module:function"),
        ({"transport": {"listen": "localhost"}}, "transport.listen = 'localhost'", "pattern"),
    ],
)
def test_rejects_out_of_range_value_naming_path_value_and_allowed(
    doc: dict[str, Any], path: str, allowed: str
) -> None:
    message = config_error(doc)

    assert path in message
    assert allowed in message


def test_reports_every_bad_key_at_once() -> None:
    message = config_error({"job": {"rounds": 0, "seed": -1}, "client": {"lr": 0}})

    assert "job.rounds = 0" in message
    assert "job.seed = -1" in message
    assert "client.lr = 0" in message


def test_rejects_a_document_that_is_not_a_mapping() -> None:
    message = config_error(["job", "rounds"])

    assert "job.yaml" in message
    assert "mapping" in message


def test_rejects_a_section_that_is_not_a_mapping() -> None:
    message = config_error({"job": 5})

    assert "job = 5" in message


# ------------------------------------------------------------------ settings that can never work


def test_refuses_fewer_workers_than_min_workers_naming_both_keys() -> None:
    message = config_error({"job": {"workers": 2}, "round": {"min_workers": 3}})

    assert message.startswith("job.yaml: job.workers = 2 is below round.min_workers = 3: no round could ever open")


def test_fewer_workers_from_a_set_is_blamed_on_the_set() -> None:
    # What `enclavefl run JOB --workers 2` passes for a job with min_workers 3.
    message = config_error({"job": {"workers": 3}, "round": {"min_workers": 3}}, ["job.workers=2"])

    assert message.startswith("--set job.workers=2: job.workers = 2 is below round.min_workers = 3")


def test_min_workers_raised_by_a_set_is_blamed_on_the_set() -> None:
    message = config_error({"job": {"workers": 3}}, ["round.min_workers=4"])

    assert message.startswith("--set round.min_workers=4: job.workers = 3 is below round.min_workers = 4")


def test_accepts_min_workers_below_workers() -> None:
    # Rounds that need fewer than all workers (a worker may be lost) are a valid intent.
    config = parse_job({"job": {"workers": 10}, "round": {"min_workers": 8}})

    assert (config.job.workers, config.round.min_workers) == (10, 8)


def test_accepts_min_workers_equal_to_workers() -> None:
    config = parse_job({"job": {"workers": 3}, "round": {"min_workers": 3}})

    assert config.round.min_workers == 3


def test_refuses_sync_min_updates_above_workers() -> None:
    message = config_error({"job": {"workers": 2}, "round": {"min_updates": 3}})

    assert "job.workers = 2 is below round.min_updates = 3" in message


def test_accepts_async_min_updates_above_workers() -> None:
    # Async updates accumulate across steps: a few workers can send many updates.
    config = parse_job({"job": {"workers": 2}, "round": {"mode": "async", "min_updates": 3}})

    assert config.round.min_updates == 3


def test_check_worker_count_names_the_given_count_and_min_workers() -> None:
    config = parse_job({"job": {"workers": 3}, "round": {"min_workers": 3}})

    with pytest.raises(ConfigError) as info:
        check_worker_count(config, 2, "--of")

    assert str(info.value).startswith("--of 2 is below round.min_workers = 3")


def test_check_worker_count_accepts_enough_workers() -> None:
    config = parse_job({"job": {"workers": 3}, "round": {"min_workers": 2}})

    check_worker_count(config, 2, "--of")


# ------------------------------------------------------------------ --set overrides


@pytest.mark.parametrize(
    ("item", "key"), [("job.rounds=4", "job.rounds"), (" round.fraction = 0.5", "round.fraction"),
                      ("fl_iteration_num=3", "job.rounds")]
)
def test_override_key_is_the_dotted_key_set(item: str, key: str) -> None:
    assert override_key(item) == key



def test_set_reads_typed_yaml_scalars() -> None:
    config = parse_job(
        {},
        overrides=[
            "job.rounds=3",
            "round.fraction=0.5",
            "job.name=demo-1",
            "task.data_dir=",
            "attestation.mode=none",
        ],
    )

    assert config.job.rounds == 3
    assert config.round.fraction == 0.5
    assert config.job.name == "demo-1"
    assert config.task.data_dir == ""
    assert config.attestation.mode == "none"


def test_set_replaces_a_value_from_the_file() -> None:
    config = parse_job({"job": {"rounds": 10, "seed": 4}}, overrides=["job.rounds=2"])

    assert config.job.rounds == 2
    assert config.job.seed == 4  # siblings survive


def test_set_reaches_nested_sections() -> None:
    config = parse_job({}, overrides=["transport.tls.server_name=ps.example", "task.params.hidden=[32, 16]"])

    assert config.transport.tls.server_name == "ps.example"
    assert config.task.params == {"hidden": [32, 16]}


def test_later_set_wins() -> None:
    config = parse_job({}, overrides=["job.rounds=3", "job.rounds=4"])

    assert config.job.rounds == 4


def test_apply_overrides_does_not_change_its_input() -> None:
    doc = {"job": {"rounds": 10}}

    out = apply_overrides(doc, ["job.rounds=2"])

    assert doc == {"job": {"rounds": 10}}
    assert out == {"job": {"rounds": 2}}


@pytest.mark.parametrize("item", ["foo", "=3", "job.rounds", " =1"])
def test_set_rejects_an_item_without_key_and_value(item: str) -> None:
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_job({}, overrides=[item])


@pytest.mark.parametrize("item", ["job=3", "job..rounds=3", ".rounds=3"])
def test_set_rejects_a_key_that_is_not_a_path(item: str) -> None:
    with pytest.raises(ConfigError, match="not a key path"):
        parse_job({}, overrides=[item])


def test_set_rejects_an_unknown_key_path_blaming_the_set() -> None:
    message = config_error({}, ["job.roundz=3"])

    assert message.startswith("--set job.roundz=3: job.roundz: unknown key; did you mean rounds? (valid: ")


def test_set_rejects_descending_into_a_value() -> None:
    message = config_error({"job": {"rounds": 3}}, ["job.rounds.max=4"])

    assert "'rounds' in 'job.rounds.max' is not a section" in message


def test_set_value_is_validated_like_the_file_and_blamed_on_the_set() -> None:
    message = config_error({"round": {"fraction": 0.5}}, ["round.fraction=2"])

    assert message == "--set round.fraction=2: round.fraction = 2: must be <= 1"


def test_set_alias_error_is_blamed_on_the_set() -> None:
    message = config_error({}, ["fl_iteration_num=0"])

    assert message == "--set fl_iteration_num=0: job.rounds = 0: must be >= 1"


def test_errors_from_file_and_set_are_each_blamed_on_their_origin() -> None:
    message = config_error({"job": {"rounds": 0}}, ["client.lr=0"])

    assert message.splitlines() == [
        "job.yaml: invalid job configuration:",
        "  job.rounds = 0: must be >= 1",
        "  --set client.lr=0: client.lr = 0: must be > 0",
    ]


def test_only_the_set_that_gave_the_bad_value_is_blamed() -> None:
    message = config_error({"round": {"fraction": 2}}, ["job.rounds=3"])

    assert message.startswith("job.yaml: round.fraction = 2")


def test_set_rejects_a_value_that_is_not_yaml() -> None:
    message = config_error({}, ["task.params=[1, 2"])

    assert "task.params" in message
    assert "not a YAML scalar" in message


# ------------------------------------------------------------------ cloud FL aliases


@pytest.mark.parametrize(
    ("alias", "value", "section", "key", "expected"),
    [
        ("fl_iteration_num", 20, "job", "rounds", 20),
        ("start_fl_job_threshold", 2, "round", "min_workers", 2),
        ("start_fl_job_time_window", 3000, "round", "start_window_s", 3.0),
        ("update_model_ratio", 0.5, "round", "update_ratio", 0.5),
        ("update_model_time_window", 45000, "round", "update_window_s", 45.0),
        ("client_epoch_num", 3, "client", "epochs", 3),
        ("client_batch_size", 16, "client", "batch_size", 16),
        ("client_learning_rate", 0.01, "client", "lr", 0.01),
    ],
)
def test_cloud_alias_maps_to_our_key(alias: str, value: Any, section: str, key: str, expected: Any) -> None:
    config = parse_job({alias: value})

    assert getattr(getattr(config, section), key) == pytest.approx(expected)


def test_every_cloud_alias_targets_an_existing_key() -> None:
    defaults = JobConfig().to_dict()
    for alias, (dotted, _factor) in CLOUD_KEY_ALIASES.items():
        *sections, key = dotted.split(".")
        node = defaults
        for section in sections:
            node = node[section]
        assert key in node, alias


def test_cloud_alias_keeps_other_keys_of_its_section() -> None:
    config = parse_job({"update_model_time_window": 2000, "round": {"min_workers": 2}})

    assert config.round.update_window_s == pytest.approx(2.0)
    assert config.round.min_workers == 2


def test_cloud_time_window_rejects_a_non_number() -> None:
    message = config_error({"start_fl_job_time_window": True})

    assert "start_fl_job_time_window" in message
    assert "milliseconds" in message


def test_cloud_alias_value_is_validated_under_our_key() -> None:
    message = config_error({"fl_iteration_num": 0})

    assert "job.rounds = 0" in message


def test_set_accepts_a_cloud_alias() -> None:
    config = parse_job({"job": {"rounds": 10}}, overrides=["fl_iteration_num=2", "update_model_time_window=1500"])

    assert config.job.rounds == 2
    assert config.round.update_window_s == pytest.approx(1.5)


def test_set_overrides_a_cloud_alias_given_in_the_file() -> None:
    # A file in the cloud cluster's spelling, overridden with our spelling on the command line.
    config = parse_job({"fl_iteration_num": 20, "update_model_time_window": 60000}, overrides=["job.rounds=2"])

    assert config.job.rounds == 2
    assert config.round.update_window_s == pytest.approx(60.0)


# ------------------------------------------------------------------ faults (experiments)


def test_faults_are_off_by_default() -> None:
    faults = parse_job({}).faults

    assert (faults.byzantine, faults.slow) == (0, 0)
    assert (faults.attack, faults.scale, faults.slowdown) == ("sign_flip", 10.0, 5.0)


def test_faults_section_is_read_from_the_file_and_from_set() -> None:
    config = parse_job({"faults": {"byzantine": 2, "attack": "noise"}}, overrides=["faults.slow=3", "faults.scale=0.5"])

    assert (config.faults.byzantine, config.faults.attack, config.faults.slow, config.faults.scale) == (2, "noise", 3, 0.5)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("byzantine", -1, "faults.byzantine = -1"),
        ("slow", -2, "faults.slow = -2"),
        ("scale", 0, "faults.scale = 0"),
        ("slowdown", 0.5, "faults.slowdown = 0.5"),
        ("byzantine", True, "faults.byzantine = True"),
    ],
)
def test_faults_rejects_out_of_range_values(key: str, value: Any, expected: str) -> None:
    message = config_error({"faults": {key: value}})

    assert expected in message


def test_faults_rejects_an_unknown_attack_naming_the_allowed_ones() -> None:
    message = config_error({"faults": {"attack": "backdoor"}})

    assert "faults.attack = 'backdoor'" in message
    assert "sign_flip" in message and "noise" in message


def test_faults_rejects_an_unknown_key() -> None:
    message = config_error({"faults": {"stragglers": 2}})

    assert "faults.stragglers: unknown key" in message


# ------------------------------------------------------------------ load_job


def test_load_job_reads_yaml(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("job:\n  rounds: 4\nround:\n  min_workers: 2\n", encoding="utf-8")

    config = load_job(path, ["job.seed=9"])

    assert (config.job.rounds, config.job.seed, config.round.min_workers) == (4, 9, 2)


def test_load_job_on_missing_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"

    with pytest.raises(ConfigError, match=re.escape(str(path))) as info:
        load_job(path)

    assert "cannot read job file" in str(info.value)


def test_load_job_on_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("job:\n  rounds: [1, 2\n", encoding="utf-8")

    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_job(path)

    assert str(path) in str(info.value)


def test_load_job_refuses_python_tags(tmp_path: Path) -> None:
    # Only the safe loader is used: a tag that would build an object is an error.
    path = tmp_path / "evil.yaml"
    path.write_text("job: !!python/object/apply:os.system ['true']\n", encoding="utf-8")

    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job(path)


def test_load_job_names_the_file_and_key_of_a_bad_value(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("round:\n  update_ratio: 0\n", encoding="utf-8")

    with pytest.raises(ConfigError) as info:
        load_job(path)

    assert str(path) in str(info.value)
    assert "round.update_ratio = 0" in str(info.value)


@pytest.mark.parametrize("text", ["", "# only a comment\n\n# and another\n", "{}\n"])
def test_load_job_refuses_an_empty_file(tmp_path: Path, text: str) -> None:
    # Defaults would train the digits demo, which an empty file surely did not mean.
    path = tmp_path / "empty.yaml"
    path.write_text(text, encoding="utf-8")

    with pytest.raises(ConfigError) as info:
        load_job(path, ["job.rounds=2"])

    assert str(info.value).startswith(f"{path}: the job file is empty")


def test_examples_exist() -> None:
    assert EXAMPLES, f"no examples/**/*.yaml under {REPO}"


@pytest.mark.parametrize("path", EXAMPLES, ids=[str(p.relative_to(REPO)) for p in EXAMPLES])
def test_example_job_loads(path: Path) -> None:
    config = load_job(path)

    assert isinstance(config, JobConfig)
