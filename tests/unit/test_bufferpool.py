"""BufferPool: a buffer is lent again only once nothing refers to it."""

from __future__ import annotations

import weakref

import numpy as np
import pytest

from enclavefl.bufferpool import BufferPool
from enclavefl.tensors import ParamSet, StreamDecoder, StreamHeader, decode, iter_chunks


def test_take_returns_uint8_of_the_asked_size() -> None:
    buffer = BufferPool(1).take(10)

    assert buffer.dtype == np.uint8 and buffer.shape == (10,)


def test_a_dropped_buffer_is_lent_again() -> None:
    pool = BufferPool(1)
    first = pool.take(64)
    first[:] = 7
    del first

    again = pool.take(64)

    assert pool.reused == 1 and pool.allocated == 1
    assert (again == 7).all()  # the same memory, not zeroed


def test_a_buffer_with_a_live_view_is_not_lent_again() -> None:
    pool = BufferPool(1)
    view = pool.take(64).view(np.float32)[2:4]

    other = pool.take(64)
    other[:] = 0xFF
    view[:] = 1.5

    assert pool.reused == 0 and pool.allocated == 2
    assert (other == 0xFF).all() and (view == 1.5).all()


def test_a_buffer_held_by_a_memoryview_is_not_lent_again() -> None:
    pool = BufferPool(1)
    exported = memoryview(pool.take(8))

    pool.take(8)

    assert pool.reused == 0
    exported.release()


def test_a_larger_free_buffer_serves_a_smaller_request() -> None:
    pool = BufferPool(1)
    del_me = pool.take(100)
    del del_me

    smaller = pool.take(40)

    assert pool.reused == 1 and smaller.shape == (40,)


def test_a_free_buffer_too_small_is_replaced() -> None:
    pool = BufferPool(1)
    small = pool.take(10)
    del small
    big = pool.take(100)
    assert pool.allocated == 2 and pool.reused == 0
    del big

    pool.take(100)

    assert pool.reused == 1  # the 100-byte buffer took the 10-byte one's place in the pool of one


def test_the_pool_keeps_at_most_max_buffers() -> None:
    pool = BufferPool(2)
    held = [pool.take(8) for _ in range(3)]
    del held

    again = [pool.take(8) for _ in range(3)]

    assert len(again) == 3 and pool.reused == 2 and pool.allocated == 4


def test_a_full_pool_forgets_a_buffer_in_use_so_its_user_frees_it() -> None:
    pool = BufferPool(1)
    in_use = pool.take(64)
    pooled = weakref.ref(in_use.base)

    pool.take(64)  # the first is still in use: a new one takes its place in the pool
    del in_use

    assert pooled() is None  # nothing kept the first buffer alive


def test_a_buffer_over_max_buffer_bytes_is_not_kept() -> None:
    pool = BufferPool(1, max_buffer_bytes=50)
    big = pool.take(100)
    del big
    pool.take(100)
    small = pool.take(50)
    del small

    pool.take(50)

    assert pool.allocated == 3 and pool.reused == 1


def test_zero_buffers_never_reuses() -> None:
    pool = BufferPool(0)
    first = pool.take(8)
    del first

    pool.take(8)

    assert pool.reused == 0 and pool.allocated == 2


def test_refuses_a_negative_count() -> None:
    with pytest.raises(ValueError, match="max_buffers"):
        BufferPool(-1)


def test_refuses_a_negative_byte_limit() -> None:
    with pytest.raises(ValueError, match="max_buffer_bytes"):
        BufferPool(1, max_buffer_bytes=-1)


def _params(value: float) -> ParamSet:
    return ParamSet({"w": np.full((3, 4), value, dtype=np.float32), "b": np.arange(5, dtype=np.int64)})


def test_decoders_sharing_a_pool_do_not_overwrite_tensors_still_in_use() -> None:
    pool = BufferPool(1)
    header = StreamHeader.of(_params(1.0))
    first = decode(header, iter_chunks(_params(1.0), 16))
    kept = StreamDecoder(header, pool=pool)
    for chunk in iter_chunks(_params(2.0), 16):
        kept.feed(chunk)
    in_use = kept.finish()

    second = StreamDecoder(header, pool=pool)
    for chunk in iter_chunks(_params(3.0), 16):
        second.feed(chunk)
    later = second.finish()

    assert in_use == _params(2.0) and later == _params(3.0) and first == _params(1.0)
    assert pool.reused == 0


def test_a_decoder_reuses_the_buffer_of_a_model_no_longer_viewed() -> None:
    pool = BufferPool(1)
    header = StreamHeader.of(_params(1.0))
    for value in (1.0, 2.0):
        decoder = StreamDecoder(header, pool=pool)
        for chunk in iter_chunks(_params(value), 16):
            decoder.feed(chunk)
        params = decoder.finish()
        assert params == _params(value)
        del params, decoder

    assert pool.allocated == 1 and pool.reused == 1
