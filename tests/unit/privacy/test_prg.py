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


def test_keystream_blocks_continue_the_expanded_mask() -> None:
    # Blocks of 3, 0 and 4 words are words 0..2 and 3..6 of the seed's mask.
    from enclavefl.privacy.secagg.prg import Keystream

    seed = bytes(range(32))
    stream = Keystream(seed, block_words=4)
    got = [stream.next(3).copy(), stream.next(0).copy(), stream.next(4).copy()]
    np.testing.assert_array_equal(np.concatenate(got), expand_mask(seed, 7))


def test_keystream_refuses_more_words_than_its_block() -> None:
    import pytest

    from enclavefl.privacy.secagg.prg import Keystream

    with pytest.raises(ValueError, match="0..4 words"):
        Keystream(bytes(32), block_words=4).next(5)
