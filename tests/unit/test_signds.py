"""SignDS's mechanism (Jiang et al. 2022): the top-k size, the exponential mechanism over index sets, the release."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from enclavefl.signds import count_distribution, select_dimensions, signds_dims_out, signds_top_k


def test_top_k_is_the_floor_of_the_rate_times_d_and_at_least_one() -> None:
    assert signds_top_k(1000, 0.01) == 10
    assert signds_top_k(10, 0.01) == 1


def test_top_k_needs_two_coordinates() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        signds_top_k(1, 0.2)


def test_count_distribution_weighs_set_counts_by_the_exponential_mechanism() -> None:
    # d=4, k=1, h=2, threshold ceil(0.5*2)=1, epsilon=ln 2:
    # nu=0: C(1,0) C(3,2) = 3 sets, weight 1 -> 3;  nu=1: C(1,1) C(3,1) = 3 sets, weight e^ln2 = 2 -> 6;
    # nu=2 is impossible with k=1.
    np.testing.assert_allclose(count_distribution(4, 1, 2, math.log(2), 0.5), [1 / 3, 2 / 3, 0.0])


def test_every_index_set_is_epsilon_dp_whatever_the_top_k_set() -> None:
    # P[J | topk] = P[nu] / (C(k,nu) C(d-k,h-nu)) with nu = |J & topk|: enumerate every J and two top-k sets.
    d, k, h, eps, ratio = 6, 2, 3, 1.5, 0.6
    p = count_distribution(d, k, h, eps, ratio)

    def prob(subset: tuple[int, ...], top: set[int]) -> float:
        nu = len(top & set(subset))
        return float(p[nu]) / (math.comb(k, nu) * math.comb(d - k, h - nu))

    tops = [set(t) for t in itertools.combinations(range(d), k)]
    for subset in itertools.combinations(range(d), h):
        probs = [prob(subset, top) for top in tops]
        assert max(probs) <= math.exp(eps) * min(probs) * (1 + 1e-12)
    assert sum(prob(s, tops[0]) for s in itertools.combinations(range(d), h)) == pytest.approx(1.0)


def test_large_epsilon_selects_the_top_k_in_the_drawn_signs_direction() -> None:
    flat = np.array([5.0, -1.0, 0.0, 3.0, -4.0, 2.0])
    seen = set()
    for seed in range(20):
        indices, sign = select_dimensions(flat, k=2, h=2, epsilon=50.0, threshold_ratio=1.0,
                                          rng=np.random.default_rng(seed))
        # +1: the two largest values (5 at 0, 3 at 3); -1: the two smallest (-4 at 4, -1 at 1).
        assert indices.tolist() == ([0, 3] if sign == 1 else [1, 4])
        seen.add(sign)
    assert seen == {-1, 1}


def test_release_is_h_sorted_distinct_int64_indices() -> None:
    rng = np.random.default_rng(0)
    indices, sign = select_dimensions(rng.normal(size=1000), k=10, h=7, epsilon=5.0, threshold_ratio=0.6, rng=rng)
    assert indices.dtype == np.int64 and indices.shape == (7,)
    assert np.all(np.diff(indices) > 0) and 0 <= indices[0] and indices[-1] < 1000
    assert sign in (-1, 1)


def test_release_draws_the_top_k_count_from_its_distribution() -> None:
    flat = np.arange(20.0)
    d, k, h, eps, ratio = 20, 4, 3, 1.0, 0.6
    p = count_distribution(d, k, h, eps, ratio)
    rng = np.random.default_rng(1)
    counts = np.zeros(h + 1)
    for _ in range(4000):
        indices, sign = select_dimensions(flat, k=k, h=h, epsilon=eps, threshold_ratio=ratio, rng=rng)
        top = set(range(16, 20)) if sign == 1 else set(range(4))
        counts[len(top & set(indices.tolist()))] += 1
    np.testing.assert_allclose(counts / 4000, p, atol=0.03)


def test_release_refuses_an_update_that_is_not_finite() -> None:
    with pytest.raises(ValueError, match="not finite"):
        select_dimensions(np.array([1.0, np.nan, 0.0]), k=1, h=1, epsilon=1.0, threshold_ratio=0.6,
                          rng=np.random.default_rng(0))


def test_dims_out_given_is_used_as_is() -> None:
    assert signds_dims_out(1000, 10, 5.0, 0.6, dims_out=7) == 7


def test_dims_out_chosen_is_one_for_a_small_epsilon_and_more_for_a_large_one() -> None:
    # epsilon 0.1 on d=61706: the selection is nearly uniform, one index already adds more noise than signal.
    assert signds_dims_out(61706, 617, 0.1, 0.6) == 1
    assert signds_dims_out(61706, 617, 100.0, 0.6) > 10
