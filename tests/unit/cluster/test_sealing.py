"""Sealed values: tampered, replayed or foreign values are refused; Redis never holds a parameter in clear."""

from __future__ import annotations

from collections.abc import Iterator
import itertools

import numpy as np
import pytest

from enclavefl.cluster import RedisStore, SealedStore, Sealer, SealedValueRejected, UpdateRef
from enclavefl.errors import ConfigError
from tests.unit.cluster.conftest import CLUSTER_KEY, redis_store
from tests.unit.cluster.redis_server import RedisServer

JOB = "sealing"


def sealer(key: bytes = CLUSTER_KEY, job: str = JOB) -> Sealer:
    return Sealer(key, job=job)


# -- the sealer ------------------------------------------------------------------------------------


def test_sealed_value_opens_under_the_same_kind_and_version() -> None:
    sealed = sealer().seal(b"weights", "model", 3)

    assert sealer().open(sealed, "model", 3) == b"weights"


def test_sealed_value_does_not_show_its_plaintext() -> None:
    assert b"weights" not in sealer().seal(b"weights", "model", 3)


def test_flipped_bit_is_refused() -> None:
    sealed = bytearray(sealer().seal(b"weights", "model", 3))
    sealed[-20] ^= 0x01

    with pytest.raises(SealedValueRejected, match="model/3: the sealed value failed authentication"):
        sealer().open(bytes(sealed), "model", 3)


def test_value_of_another_version_is_refused() -> None:
    sealed = sealer().seal(b"weights", "model", 3)

    with pytest.raises(SealedValueRejected):
        sealer().open(sealed, "model", 4)


def test_value_of_another_kind_is_refused() -> None:
    sealed = sealer().seal(b"moments", "strategy", 3)

    with pytest.raises(SealedValueRejected):
        sealer().open(sealed, "model", 3)


def test_value_of_another_job_is_refused() -> None:
    sealed = sealer(job="other").seal(b"weights", "model", 3)

    with pytest.raises(SealedValueRejected):
        sealer().open(sealed, "model", 3)


def test_value_under_another_cluster_key_is_refused() -> None:
    sealed = sealer(key=bytes(32)).seal(b"weights", "model", 3)

    with pytest.raises(SealedValueRejected):
        sealer().open(sealed, "model", 3)


def test_plaintext_is_refused_as_not_sealed() -> None:
    with pytest.raises(SealedValueRejected, match="not a sealed value"):
        sealer().open(b"plain weights, long enough to pass for sealed", "model", 3)


def test_cluster_key_of_the_wrong_length_is_refused() -> None:
    with pytest.raises(ConfigError, match="expected 32 bytes, got 16"):
        Sealer(bytes(16), job=JOB)


def test_sealer_repr_does_not_show_the_key() -> None:
    assert CLUSTER_KEY.hex() not in repr(sealer()) and repr(CLUSTER_KEY) not in repr(sealer())


# -- sealed values in Redis ------------------------------------------------------------------------


_jobs = itertools.count()


class Raw:
    """A raw Redis client limited to one job's keys."""

    def __init__(self, server: RedisServer, job: str) -> None:
        self.client = server.client()
        self.pattern = f"efl:{{{job}}}:*"

    def key(self, suffix: str) -> bytes:
        """The one key of the job whose name ends in ``suffix``."""
        found = [k for k in self.client.scan_iter(self.pattern) if k.endswith(suffix.encode())]
        assert len(found) == 1, found
        key: bytes = found[0]
        return key

    def values(self) -> list[bytes]:
        """DUMP of every key of the job, plus its value(s) read as what it is (a dump may compress)."""
        values = []
        for key in self.client.scan_iter(self.pattern):
            values.append(self.client.dump(key))
            kind = self.client.type(key)
            if kind == b"string":
                values.append(self.client.get(key))
            elif kind == b"hash":
                values.extend(self.client.hgetall(key).values())
            elif kind == b"set":
                values.extend(self.client.smembers(key))
        return values


@pytest.fixture
def redis_pair(redis_server: RedisServer) -> Iterator[tuple[SealedStore, RedisStore, Raw]]:
    """A sealed store over Redis, the Redis store under it, and a raw client (of this job's keys) to tamper with."""
    job = f"sealing-{next(_jobs)}"
    inner = redis_store(redis_server, job=job)
    raw = Raw(redis_server, job)
    yield SealedStore(inner, sealer()), inner, raw
    raw.client.close()
    inner.close()


def flip_bit(value: bytes) -> bytes:
    flipped = bytearray(value)
    flipped[len(flipped) // 2] ^= 0x10
    return bytes(flipped)


def test_model_with_a_bit_flipped_in_redis_is_refused(redis_pair: tuple[SealedStore, RedisStore, Raw]) -> None:
    store, _, raw = redis_pair
    store.publish_model(0, b"model zero")
    key = raw.key(":model:0")
    raw.client.set(key, flip_bit(raw.client.get(key)))

    with pytest.raises(SealedValueRejected, match="model/0"):
        store.model()


def test_old_model_written_back_as_the_next_version_is_refused(redis_pair: tuple[SealedStore, RedisStore, Raw]) -> None:
    store, _, raw = redis_pair
    store.publish_model(0, b"model zero")
    store.publish_model(1, b"model one")
    raw.client.set(raw.key(":model:1"), raw.client.get(raw.key(":model:0")))

    with pytest.raises(SealedValueRejected, match="model/1"):
        store.model(1)


def test_old_strategy_state_written_back_is_refused(redis_pair: tuple[SealedStore, RedisStore, Raw]) -> None:
    store, _, raw = redis_pair
    store.publish_model(0, b"m0", strategy_state=b"moments zero")
    old = raw.client.hget(raw.key(":strategy"), "blob")
    store.publish_model(1, b"m1", strategy_state=b"moments one")
    raw.client.hset(raw.key(":strategy"), "blob", old)

    with pytest.raises(SealedValueRejected, match="strategy/1"):
        store.strategy_state()


def test_partial_copied_over_another_servers_is_refused(redis_pair: tuple[SealedStore, RedisStore, Raw]) -> None:
    store, _, raw = redis_pair
    store.publish_model(0, b"m0")
    store.open_round(1, 0, model_version=0, sampled=["w1", "w2"], required=2)
    store.accept(1, 0, "s1", [UpdateRef("w1", "u1")], b"sum of s1", generation=0)
    store.accept(1, 0, "s2", [UpdateRef("w2", "u2")], b"sum of s2", generation=0)
    raw.client.hset(raw.key(":partial:s2"), "blob", raw.client.hget(raw.key(":partial:s1"), "blob"))

    with pytest.raises(SealedValueRejected, match="partial/1/0/s2"):
        store.partials(1, 0)


def test_partial_whose_ids_were_changed_in_redis_is_refused(redis_pair: tuple[SealedStore, RedisStore, Raw]) -> None:
    store, _, raw = redis_pair
    store.publish_model(0, b"m0")
    store.open_round(1, 0, model_version=0, sampled=["w1", "w2"], required=2)
    store.accept(1, 0, "s1", [UpdateRef("w1", "u1")], b"sum", generation=0)
    raw.client.hset(raw.key(":partial:s1"), "ids", '["u1", "u9"]')

    with pytest.raises(SealedValueRejected):
        store.partials(1, 0)


def test_config_with_a_bit_flipped_in_redis_is_refused(redis_pair: tuple[SealedStore, RedisStore, Raw]) -> None:
    store, _, raw = redis_pair
    store.put_config(b"server: {lr: 1.0}")
    key = raw.key(":config")
    raw.client.set(key, flip_bit(raw.client.get(key)))

    with pytest.raises(SealedValueRejected, match="config"):
        store.config()


# -- no plaintext parameter in a Redis dump ----------------------------------------------------------

# 256 float32 values from a seeded generator: bytes that appear nowhere by chance and do not compress.
PARAMS = np.random.default_rng(14).standard_normal(256).astype("<f4")


def write_job_state(store: SealedStore | RedisStore) -> None:
    """Every kind of value a job keeps, each holding the known parameters."""
    blob = PARAMS.tobytes()
    store.put_config(b"job: {name: dump}\n" + blob)
    store.publish_model(0, blob, strategy_state=blob)
    store.open_round(1, 0, model_version=0, sampled=["w1", "w2"], required=2)
    store.accept(1, 0, "s1", [UpdateRef("w1", "u1")], blob, generation=0)
    store.accept(1, 0, "s2", [UpdateRef("w2", "u2")], (PARAMS * 2).tobytes(), generation=0)


def holds_a_parameter(values: list[bytes]) -> bool:
    """Whether any value holds 4 consecutive known float32 values (16 bytes) of the model or a partial."""
    needles = [arr.tobytes()[i:i + 16] for arr in (PARAMS, PARAMS * 2) for i in range(0, arr.nbytes - 16, 4)]
    return any(needle in value for value in values for needle in needles)


def test_redis_dump_of_a_sealed_job_holds_no_plaintext_parameter(redis_pair: tuple[SealedStore, RedisStore, Raw]) -> None:
    store, _, raw = redis_pair
    write_job_state(store)

    assert not holds_a_parameter(raw.values())


def test_the_dump_scan_finds_parameters_of_an_unsealed_job(redis_pair: tuple[SealedStore, RedisStore, Raw]) -> None:
    # The check above means something only if the scan sees parameters stored in clear.
    _, inner, raw = redis_pair
    write_job_state(inner)

    assert holds_a_parameter(raw.values())


def test_restarted_server_continues_its_sealed_partial(redis_pair: tuple[SealedStore, RedisStore, Raw]) -> None:
    # A new process (a new SealedStore) learns the ids of the partial it extends from the store.
    store, inner, _ = redis_pair
    store.publish_model(0, b"m0")
    store.open_round(1, 0, model_version=0, sampled=["w1", "w2"], required=2)
    store.accept(1, 0, "s1", [UpdateRef("w1", "u1")], b"sum-1", generation=0)
    restarted = SealedStore(inner, sealer())

    restarted.accept(1, 0, "s1", [UpdateRef("w2", "u2")], b"sum-12", generation=1)

    assert store.partials(1, 0)["s1"].blob == b"sum-12"
