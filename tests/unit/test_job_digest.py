from __future__ import annotations

import numpy as np

from enclavefl.config import parse_job
from enclavefl.job_digest import MODEL_KEY, differing_settings, job_digests
from enclavefl.tensors import ParamSet, StreamHeader

MODEL = StreamHeader.of(ParamSet({"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}))


def test_the_same_job_and_model_give_the_same_digests() -> None:
    config = parse_job({"job": {"seed": 3}, "task": {"params": {"hidden": [8]}}})

    assert job_digests(config, MODEL) == job_digests(parse_job(config.to_dict()), MODEL)


def test_differing_params_seed_and_model_are_named() -> None:
    ps = job_digests(parse_job({"job": {"seed": 3}, "task": {"params": {"hidden": [64]}}}), MODEL)
    other_model = StreamHeader.of(ParamSet({"w": np.zeros((2, 4), np.float32), "b": np.zeros(4, np.float32)}))
    worker = job_digests(parse_job({"job": {"seed": 4}, "task": {"params": {"hidden": [32]}}}), other_model)

    assert differing_settings(ps, worker) == ["job.seed", MODEL_KEY, "task.params"]


def test_settings_that_may_differ_between_hosts_are_not_compared() -> None:
    ps = job_digests(parse_job({"task": {"data_dir": "/a"}, "client": {"lr": 0.1}, "round": {"min_workers": 2}}), MODEL)
    worker = job_digests(parse_job({"task": {"data_dir": "/b"}, "client": {"lr": 0.2}}), MODEL)

    assert differing_settings(ps, worker) == []


def test_alpha_counts_only_for_the_partitions_that_read_it() -> None:
    iid = [job_digests(parse_job({"task": {"partition": "iid", "alpha": a}}), MODEL) for a in (0.1, 0.9)]
    skewed = [job_digests(parse_job({"task": {"partition": "dirichlet", "alpha": a}}), MODEL) for a in (0.1, 0.9)]

    assert differing_settings(*iid) == []
    assert differing_settings(*skewed) == ["task.alpha"]


def test_a_key_only_one_side_has_differs() -> None:
    assert differing_settings({"a": "1"}, {"a": "1", "b": "2"}) == ["b"]


def test_a_ps_without_the_privacy_the_worker_asks_for_is_named() -> None:
    # The worker's owner asked for secure aggregation and DP; the PS's file has neither.
    ps = job_digests(parse_job({"round": {"min_workers": 3}}), MODEL)
    worker = job_digests(parse_job({
        "round": {"min_workers": 3},
        "privacy": {"secure_aggregation": {"enabled": True},
                    "dp": {"enabled": True, "clip_norm": 1.0, "noise_multiplier": 1.0}}}), MODEL)

    assert differing_settings(ps, worker) == ["privacy.dp", "privacy.secure_aggregation"]


def test_a_different_noise_multiplier_is_named() -> None:
    low, high = (job_digests(parse_job({"privacy": {"dp": {"enabled": True, "clip_norm": 1.0, "noise_multiplier": z}}}),
                             MODEL) for z in (0.5, 1.0))

    assert differing_settings(low, high) == ["privacy.dp"]
