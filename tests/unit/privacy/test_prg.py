"""Mask expansion: deterministic per seed, different across seeds, near-uniform words."""

from __future__ import annotations

import numpy as np

from enclavefl.privacy.secagg.prg import expand_mask


def test_same_seed_same_mask_and_prefix_stable() -> None:
    seed = bytes(range(32))
    a = expand_mask(seed, 1000)
    assert a.dtype == np.uint32 and a.shape == (1000,)
    np.testing.assert_array_equal(a, expand_mask(seed, 1000))
    np.testing.assert_array_equal(a[:10], expand_mask(seed, 10))


def test_different_seeds_give_unrelated_masks() -> None:
    a = expand_mask(b"\x00" * 32, 10_000)
    b = expand_mask(b"\x01" + b"\x00" * 31, 10_000)
    assert np.mean(a == b) < 0.001


def test_mask_words_are_uniform_by_chi_square() -> None:
    # 16 bins of the top 4 bits, 160k words: chi-square with 15 degrees of freedom
    # exceeds 37.7 with probability 0.001 when the words are uniform.
    words = expand_mask(b"\x07" * 32, 160_000)
    counts = np.bincount(words >> 28, minlength=16)
    expected = len(words) / 16
    assert float(np.sum((counts - expected) ** 2 / expected)) < 37.7


def test_add_masks_equals_adding_each_expanded_mask() -> None:
    # 70_000 words: two full blocks of 32768 and a partial one.
    from enclavefl.privacy.secagg.prg import add_masks

    seeds = [bytes([i]) * 32 for i in range(3)]
    vector = np.arange(70_000, dtype=np.uint32)
    expected = vector.copy()
    expected += expand_mask(seeds[0], 70_000)
    expected -= expand_mask(seeds[1], 70_000)
    expected += expand_mask(seeds[2], 70_000)
    add_masks(vector, [(seeds[0], 1), (seeds[1], -1), (seeds[2], 1)])
    np.testing.assert_array_equal(vector, expected)
