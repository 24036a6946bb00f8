"""Tests for enclavefl.cluster.ledger: a server's updates are accepted by the store exactly once."""

from __future__ import annotations

import numpy as np
import pytest

from enclavefl.cluster import MemoryStore, UpdateRef
from enclavefl.cluster.ledger import StoreAggregator, metric_counts
from enclavefl.errors import UpdateRejected
from enclavefl.server.aggregator import WeightedMean
from enclavefl.server.robust import CoordinateMedian
from enclavefl.tensors import ParamSet, StreamHeader

TEMPLATE = StreamHeader.of(ParamSet({"w": np.zeros(2, np.float32)}))


def update(*values: float) -> ParamSet:
    return ParamSet({"w": np.asarray(values, np.float32)})


def open_store() -> MemoryStore:
    store = MemoryStore()
    store.publish_model(0, b"model-0")
    store.open_round(1, 0, model_version=0, sampled=["a", "b", "c"], required=3)
    return store


def server(store: MemoryStore, name: str) -> StoreAggregator:
    return StoreAggregator(WeightedMean, TEMPLATE, store, number=1, attempt=0, server=name)


def add(agg: StoreAggregator, worker: str, update_id: str, values: ParamSet, weight: float) -> None:
    """Folds and commits one update (a write of its own: nothing else is waiting)."""
    ref = UpdateRef(worker, update_id)
    with agg.name(ref, {"num_samples": int(weight)}):
        agg.add(values, weight)
    agg.commit(ref)


def test_an_accepted_update_is_in_the_ledger_and_in_the_servers_partial() -> None:
    # Prepare
    store = open_store()
    agg = server(store, "s1")

    # Execute
    add(agg, "a", "1/a", update(1, 2), 2.0)

    # Assert
    partial = store.partial(1, 0, "s1")
    assert partial is not None and partial.update_ids == {"1/a"} and partial.generation == agg.generation == 1
    merged = WeightedMean(TEMPLATE)
    merged.merge({"s1": partial.blob})
    np.testing.assert_array_equal(merged.result()["w"], [1, 2])
    state = store.round_state(1)
    assert state is not None and state.counters["num_samples"] == 2


def test_an_update_resent_to_another_server_is_refused_as_already_counted() -> None:
    # Prepare: s1 accepted a's update; s2 already holds b's.
    store = open_store()
    s1, s2 = server(store, "s1"), server(store, "s2")
    add(s1, "a", "1/a", update(1, 1), 1.0)
    add(s2, "b", "1/b", update(3, 3), 1.0)

    # Execute: a fails over and re-sends the same update id to s2.
    with pytest.raises(UpdateRejected, match="already counted"):
        add(s2, "a-new-session", "1/a", update(1, 1), 1.0)

    # Assert: s2's aggregate still holds b's update alone, and it keeps accepting.
    assert s2.count == 1
    add(s2, "c", "1/c", update(5, 5), 1.0)
    np.testing.assert_array_equal(s2.result()["w"], [4, 4])  # (3 + 5) / 2
    assert len(store.accepted(1, 0)) == 3


def test_an_update_arriving_after_the_close_began_is_refused_and_counted_nowhere() -> None:
    # Prepare
    store = open_store()
    agg = server(store, "s1")
    add(agg, "a", "1/a", update(1, 1), 1.0)
    store.begin_close(1, 0)

    # Execute / Assert
    with pytest.raises(UpdateRejected, match="closing"):
        add(agg, "b", "1/b", update(9, 9), 1.0)
    assert agg.count == 1
    np.testing.assert_array_equal(agg.result()["w"], [1, 1])
    assert list(store.accepted(1, 0)) == ["1/a"]


def test_an_unnamed_update_is_refused() -> None:
    agg = server(open_store(), "s1")

    with pytest.raises(UpdateRejected, match="named"):
        agg.add(update(1, 1), 1.0)


def test_a_buffering_aggregator_cannot_serve_a_cluster(tmp_path: object) -> None:
    with pytest.raises(UpdateRejected, match="mergeable"):
        StoreAggregator(lambda t: CoordinateMedian(t, spill_dir=tmp_path, max_buffered=2),  # type: ignore[arg-type]
                        TEMPLATE, open_store(), number=1, attempt=0, server="s1")


def test_metrics_are_counted_in_millionths() -> None:
    # 0.25 loss -> 250000 millionths; accuracy missing -> not counted; other keys ignored.
    assert metric_counts({"loss": 0.25, "other": 3.0}) == {"m:loss": 250_000, "n:loss": 1}


def test_a_server_restarted_mid_round_resumes_from_its_stored_partial() -> None:
    # Prepare: s1 accepted a's update, then its process died.
    store = open_store()
    add(server(store, "s1"), "a", "1/a", update(1, 1), 1.0)

    # Execute: s1 starts again with the same id and accepts b's update.
    again = server(store, "s1")
    add(again, "b", "1/b", update(3, 5), 1.0)

    # Assert: its partial holds both (generation 2), and the aggregate is their mean: (1+3)/2, (1+5)/2.
    partial = store.partial(1, 0, "s1")
    assert partial is not None and partial.generation == 2 and partial.update_ids == {"1/a", "1/b"}
    np.testing.assert_array_equal(again.result()["w"], [2, 3])
