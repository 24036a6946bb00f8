"""Adaptive clipping (Andrew et al. 2021): the update's share of the noise, the geometric step, the checkpointed bound."""

from __future__ import annotations

import math

import pytest

from enclavefl.errors import CheckpointError
from enclavefl.server.adaptive_clip import AdaptiveClip, next_clip_norm, update_noise_multiplier
from enclavefl.server.state import PartState


def test_update_noise_multiplier_leaves_the_count_its_share() -> None:
    # z = 1, sigma_b = 1: (1^-2 - (2*1)^-2)^(-1/2) = 0.75^-0.5 = 1.1547005
    assert update_noise_multiplier(1.0, 1.0) == pytest.approx(1.1547005, abs=1e-7)


def test_update_noise_multiplier_composes_back_to_z() -> None:
    z_delta = update_noise_multiplier(2.0, 3.0)
    assert z_delta**-2 + (2 * 3.0) ** -2 == pytest.approx(2.0**-2)


def test_update_noise_multiplier_is_zero_without_noise() -> None:
    assert update_noise_multiplier(0.0, None) == 0.0


def test_update_noise_multiplier_needs_twice_the_count_noise_above_z() -> None:
    with pytest.raises(ValueError, match="must exceed z/2"):
        update_noise_multiplier(1.0, 0.5)


def test_geometric_step_moves_the_bound_against_the_excess_of_unclipped_updates() -> None:
    # C=1, b=0.7, gamma=0.5, eta=0.2: exp(-0.2 * 0.2) = exp(-0.04) = 0.9607894
    assert next_clip_norm(1.0, 0.7, 0.5, 0.2) == pytest.approx(0.9607894, abs=1e-7)
    # b below gamma: the bound grows. exp(-0.2 * -0.5) = exp(0.1) = 1.1051709
    assert next_clip_norm(1.0, 0.0, 0.5, 0.2) == pytest.approx(1.1051709, abs=1e-7)


def test_step_without_noise_uses_the_fraction_over_the_sampled_workers() -> None:
    # 3 bits of 4 sampled: b = 0.75; C = 2 * exp(-0.2 * (0.75 - 0.5)) = 2 * exp(-0.05) = 1.9024588
    clip = AdaptiveClip(2.0, target_quantile=0.5, learning_rate=0.2, count_stddev=None, seed=0)
    step = clip.step(1, 3.0, 4)
    assert (step.round, step.clip_norm, step.unclipped) == (1, 2.0, 0.75)
    assert clip.clip_norm == pytest.approx(1.9024588, abs=1e-7)


def test_count_noise_is_the_same_for_the_same_seed_and_round_only() -> None:
    def unclipped(seed: int, round_: int) -> float:
        return AdaptiveClip(1.0, target_quantile=0.5, learning_rate=0.2, count_stddev=1.0,
                            seed=seed).step(round_, 2.0, 4).unclipped

    assert unclipped(3, 1) == unclipped(3, 1)
    assert unclipped(3, 1) != unclipped(3, 2)
    assert unclipped(3, 1) != unclipped(4, 1)
    assert unclipped(3, 1) != 0.5


def test_state_round_trips_the_bound_and_its_history() -> None:
    clip = AdaptiveClip(1.0, target_quantile=0.5, learning_rate=0.2, count_stddev=0.7, seed=5)
    clip.step(1, 1.0, 2)
    clip.step(2, 0.0, 2)
    restored = AdaptiveClip(1.0, target_quantile=0.5, learning_rate=0.2, count_stddev=0.7, seed=5)
    restored.load_state(clip.state())
    assert restored.clip_norm == clip.clip_norm and restored.history == clip.history
    # The next step continues exactly.
    assert restored.step(3, 1.0, 2) == clip.step(3, 1.0, 2)


@pytest.mark.parametrize("meta", [{"clip_norm": 0.0, "history": []}, {"clip_norm": math.inf, "history": []},
                                  {"clip_norm": 1.0, "history": [[1, "x", 0.5]]}, {"clip_norm": 1.0}])
def test_malformed_state_is_refused_and_the_bound_kept(meta: dict[str, object]) -> None:
    clip = AdaptiveClip(1.5, target_quantile=0.5, learning_rate=0.2, count_stddev=None, seed=0)
    with pytest.raises(CheckpointError, match="dp_clip"):
        clip.load_state(PartState(meta))
    assert clip.clip_norm == 1.5
