"""The Store contract, run against every implementation (the ``store`` fixture: memory, redis)."""

from __future__ import annotations

import threading
import time

import pytest

from enclavefl.cluster import (
    DuplicateUpdate,
    LeaseLost,
    Member,
    Partial,
    RoundPhase,
    Session,
    Store,
    StoreConflict,
    StoreError,
    UpdateRef,
    check_partials,
)
from enclavefl.cluster.store import AcceptedUpdate
from enclavefl.errors import ClosedError


def open_first_round(store: Store, *, sampled: tuple[str, ...] = ("w1", "w2", "w3")) -> None:
    store.publish_model(0, b"model-0")
    store.open_round(1, 0, model_version=0, sampled=sampled, required=2)


# -- membership ------------------------------------------------------------------------------------


def test_registered_member_is_listed(store: Store) -> None:
    store.register(Member("s1", "server", "127.0.0.1:7001", {"zone": "a"}), ttl_s=5)

    assert store.members() == [Member("s1", "server", "127.0.0.1:7001", {"zone": "a"})]


def test_members_filters_by_role(store: Store) -> None:
    store.register(Member("s1", "server", "h:1"), ttl_s=5)
    store.register(Member("sched", "scheduler", "h:2"), ttl_s=5)

    assert [m.member_id for m in store.members("server")] == ["s1"]


def test_member_expires_without_heartbeat(store: Store) -> None:
    store.register(Member("s1", "server", "h:1"), ttl_s=0.15)
    time.sleep(0.3)

    assert store.members() == []


def test_heartbeat_keeps_member_alive(store: Store) -> None:
    # A 1.5 s TTL, renewed after 0.1 s (room for a busy machine), outlives its first deadline.
    store.register(Member("s1", "server", "h:1"), ttl_s=1.5)
    time.sleep(0.1)

    assert store.heartbeat("s1", ttl_s=5) is True
    time.sleep(1.6)
    assert [m.member_id for m in store.members()] == ["s1"]


def test_heartbeat_of_expired_member_is_false(store: Store) -> None:
    store.register(Member("s1", "server", "h:1"), ttl_s=0.1)
    time.sleep(0.25)

    assert store.heartbeat("s1", ttl_s=5) is False


def test_deregistered_member_is_gone(store: Store) -> None:
    store.register(Member("s1", "server", "h:1"), ttl_s=5)
    store.deregister("s1")

    assert store.members() == []


# -- config and model ------------------------------------------------------------------------------


def test_config_round_trips(store: Store) -> None:
    assert store.config() is None
    store.put_config(b"job: {rounds: 3}")

    assert store.config() == b"job: {rounds: 3}"


def test_first_model_may_have_any_version(store: Store) -> None:
    store.publish_model(7, b"resumed", strategy_state=b"moments")

    assert (store.model().version, store.model().blob) == (7, b"resumed")  # type: ignore[union-attr]
    assert store.strategy_state() is not None and store.strategy_state().version == 7  # type: ignore[union-attr]


def test_model_version_gap_is_refused(store: Store) -> None:
    store.publish_model(0, b"m0")

    with pytest.raises(StoreConflict, match="version 2 cannot follow the current version 0"):
        store.publish_model(2, b"m2")
    assert store.model().version == 0  # type: ignore[union-attr]


def test_model_version_published_twice_with_other_bytes_is_refused(store: Store) -> None:
    store.publish_model(0, b"m0")
    store.publish_model(1, b"m1")

    with pytest.raises(StoreConflict):
        store.publish_model(1, b"another m1")
    assert store.model(1).blob == b"m1"  # type: ignore[union-attr]


def test_repeated_publish_of_the_same_model_is_idempotent(store: Store) -> None:
    store.publish_model(0, b"m0")
    store.publish_model(0, b"m0")

    assert store.model().version == 0  # type: ignore[union-attr]


def test_previous_model_version_is_kept_and_older_ones_pruned(store: Store) -> None:
    for v in range(3):
        store.publish_model(v, f"m{v}".encode())

    assert store.model(1).blob == b"m1"  # type: ignore[union-attr]
    assert store.model(0) is None


def test_model_is_none_before_any_publish(store: Store) -> None:
    assert store.model() is None
    assert store.strategy_state() is None


def test_publish_model_is_refused_while_a_round_is_open(store: Store) -> None:
    open_first_round(store)

    with pytest.raises(StoreConflict, match="round 1 is open"):
        store.publish_model(1, b"m1")


# -- rounds ----------------------------------------------------------------------------------------


def test_open_round_needs_a_published_model(store: Store) -> None:
    with pytest.raises(StoreConflict, match="no model version is published"):
        store.open_round(1, 0, model_version=0, sampled=["w1"], required=1)


def test_open_round_on_another_model_version_is_refused(store: Store) -> None:
    store.publish_model(4, b"m4")

    with pytest.raises(StoreConflict, match="the current version is 4"):
        store.open_round(1, 0, model_version=3, sampled=["w1"], required=1)


def test_opened_round_holds_its_sampled_workers(store: Store) -> None:
    open_first_round(store)
    state = store.round_state()

    assert state is not None
    assert (state.number, state.attempt, state.phase, state.model_version) == (1, 0, RoundPhase.OPEN, 0)
    assert (state.sampled, state.required, state.counters) == (frozenset({"w1", "w2", "w3"}), 2, {"accepted": 0})


def test_repeated_open_is_idempotent(store: Store) -> None:
    open_first_round(store)

    assert store.open_round(1, 0, model_version=0, sampled=["w1", "w2", "w3"], required=2).phase is RoundPhase.OPEN


def test_round_close_publishes_the_next_model_version(store: Store) -> None:
    open_first_round(store)
    store.accept(1, 0, "s1", [UpdateRef("w1", "u1")], b"sum-1", generation=0)
    store.begin_close(1, 0)

    state = store.finish_round(1, 0, model=b"model-1", strategy_state=b"moments-1")

    assert state.phase is RoundPhase.CLOSED
    assert (store.model().version, store.model().blob) == (1, b"model-1")  # type: ignore[union-attr]
    assert (store.strategy_state().version, store.strategy_state().blob) == (1, b"moments-1")  # type: ignore[union-attr]


def test_finish_deletes_partials_and_keeps_the_ledger(store: Store) -> None:
    open_first_round(store)
    store.accept(1, 0, "s1", [UpdateRef("w1", "u1")], b"sum-1", generation=0)
    store.begin_close(1, 0)
    store.finish_round(1, 0, model=b"model-1")

    assert store.partials(1, 0) == {}
    assert store.accepted(1, 0) == {"u1": AcceptedUpdate("w1", "u1", "s1")}


def test_repeated_finish_is_idempotent(store: Store) -> None:
    open_first_round(store)
    store.begin_close(1, 0)
    store.finish_round(1, 0, model=b"model-1")

    store.finish_round(1, 0, model=b"model-1")

    assert store.model().version == 1  # type: ignore[union-attr]


def test_finish_needs_closing(store: Store) -> None:
    open_first_round(store)

    with pytest.raises(StoreConflict, match="open -> closed is not allowed"):
        store.finish_round(1, 0, model=b"model-1")
    assert store.model().version == 0  # type: ignore[union-attr]


def test_next_round_cannot_open_before_the_previous_closed(store: Store) -> None:
    open_first_round(store)

    with pytest.raises(StoreConflict, match="round 1 is open, not closed"):
        store.open_round(2, 0, model_version=0, sampled=["w1"], required=1)


def test_a_round_cannot_be_skipped(store: Store) -> None:
    open_first_round(store)
    store.begin_close(1, 0)
    store.finish_round(1, 0, model=b"model-1")

    with pytest.raises(StoreConflict, match="the current round is 1"):
        store.open_round(3, 0, model_version=1, sampled=["w1"], required=1)


def test_next_round_opens_on_the_new_version(store: Store) -> None:
    open_first_round(store)
    store.begin_close(1, 0)
    store.finish_round(1, 0, model=b"model-1")

    state = store.open_round(2, 0, model_version=1, sampled=["w2"], required=1)

    assert (state.number, state.model_version, state.phase) == (2, 1, RoundPhase.OPEN)


def test_failed_round_reopens_as_the_next_attempt(store: Store) -> None:
    open_first_round(store)
    store.fail_round(1, 0, "too few updates")

    state = store.open_round(1, 1, model_version=0, sampled=["w2"], required=1)

    assert (state.attempt, state.phase, state.counters["accepted"]) == (1, RoundPhase.OPEN, 0)


def test_failed_round_keeps_its_reason(store: Store) -> None:
    open_first_round(store)
    store.fail_round(1, 0, "too few updates")

    assert store.round_state(1).reason == "too few updates"  # type: ignore[union-attr]


def test_failed_round_cannot_reopen_with_a_skipped_attempt(store: Store) -> None:
    open_first_round(store)
    store.fail_round(1, 0, "window passed")

    with pytest.raises(StoreConflict, match="expected 1"):
        store.open_round(1, 2, model_version=0, sampled=["w1"], required=1)


def test_failed_attempt_loses_its_partials(store: Store) -> None:
    open_first_round(store)
    store.accept(1, 0, "s1", [UpdateRef("w1", "u1")], b"sum", generation=0)
    store.fail_round(1, 0, "window passed")

    assert store.partials(1, 0) == {}


def test_closed_round_cannot_fail(store: Store) -> None:
    open_first_round(store)
    store.begin_close(1, 0)
    store.finish_round(1, 0, model=b"model-1")

    with pytest.raises(StoreConflict, match="closed -> failed is not allowed"):
        store.fail_round(1, 0, "late")


def test_transition_of_an_old_attempt_is_refused(store: Store) -> None:
    open_first_round(store)
    store.fail_round(1, 0, "window passed")
    store.open_round(1, 1, model_version=0, sampled=["w1"], required=1)

    with pytest.raises(StoreConflict, match="not the current round attempt"):
        store.begin_close(1, 0)


# -- accepted updates ------------------------------------------------------------------------------


def test_accept_records_the_updates_and_the_partial(store: Store) -> None:
    open_first_round(store)

    generation = store.accept(1, 0, "s1", [UpdateRef("w1", "u1"), UpdateRef("w2", "u2")], b"sum-12", generation=0)

    assert generation == 1
    assert store.partials(1, 0) == {"s1": Partial("s1", 1, frozenset({"u1", "u2"}), b"sum-12")}
    assert set(store.accepted(1, 0)) == {"u1", "u2"}


def test_accept_adds_to_the_round_counters(store: Store) -> None:
    open_first_round(store)
    store.accept(1, 0, "s1", [UpdateRef("w1", "u1")], b"a", generation=0, counts={"num_samples": 30, "bytes_in": 5})
    store.accept(1, 0, "s2", [UpdateRef("w2", "u2")], b"b", generation=0, counts={"num_samples": 12})

    # accepted 1 + 1; num_samples 30 + 12; bytes_in 5
    assert store.round_state(1).counters == {"accepted": 2, "num_samples": 42, "bytes_in": 5}  # type: ignore[union-attr]


def test_update_accepted_by_another_server_is_refused_and_nothing_recorded(store: Store) -> None:
    open_first_round(store)
    store.accept(1, 0, "s1", [UpdateRef("w1", "u1")], b"s1-sum", generation=0)

    with pytest.raises(DuplicateUpdate) as refused:
        store.accept(1, 0, "s2", [UpdateRef("w2", "u2"), UpdateRef("w1", "u1")], b"s2-sum", generation=0)

    assert refused.value.update_ids == ("u1",)
    assert set(store.partials(1, 0)) == {"s1"}
    assert set(store.accepted(1, 0)) == {"u1"}
    assert store.round_state(1).counters["accepted"] == 1  # type: ignore[union-attr]


def test_second_update_of_the_same_worker_is_refused(store: Store) -> None:
    open_first_round(store)
    store.accept(1, 0, "s1", [UpdateRef("w1", "u1")], b"sum", generation=0)

    with pytest.raises(DuplicateUpdate):
        store.accept(1, 0, "s1", [UpdateRef("w1", "u1-bis")], b"sum2", generation=1)


def test_duplicate_inside_one_accept_is_refused(store: Store) -> None:
    open_first_round(store)

    with pytest.raises(DuplicateUpdate):
        store.accept(1, 0, "s1", [UpdateRef("w1", "u1"), UpdateRef("w2", "u1")], b"sum", generation=0)
    assert store.accepted(1, 0) == {}


def test_accept_with_a_stale_generation_is_refused(store: Store) -> None:
    open_first_round(store)
    store.accept(1, 0, "s1", [UpdateRef("w1", "u1")], b"sum-1", generation=0)

    with pytest.raises(StoreConflict, match="generation 1, the write replaces 0"):
        store.accept(1, 0, "s1", [UpdateRef("w2", "u2")], b"sum-2", generation=0)
    assert store.partials(1, 0)["s1"].blob == b"sum-1"


def test_one_servers_partial_is_read_alone(store: Store) -> None:
    open_first_round(store)
    store.accept(1, 0, "s1", [UpdateRef("w1", "u1")], b"sum-1", generation=0)

    assert store.partial(1, 0, "s1") == Partial("s1", 1, frozenset({"u1"}), b"sum-1")
    assert store.partial(1, 0, "s2") is None


def test_partial_grows_generation_by_generation(store: Store) -> None:
    open_first_round(store)
    store.accept(1, 0, "s1", [UpdateRef("w1", "u1")], b"sum-1", generation=0)
    store.accept(1, 0, "s1", [UpdateRef("w2", "u2")], b"sum-12", generation=1)

    assert store.partials(1, 0)["s1"] == Partial("s1", 2, frozenset({"u1", "u2"}), b"sum-12")


def test_repeated_accept_is_idempotent(store: Store) -> None:
    open_first_round(store)
    store.accept(1, 0, "s1", [UpdateRef("w1", "u1")], b"sum-1", generation=0, counts={"num_samples": 3})

    assert store.accept(1, 0, "s1", [UpdateRef("w1", "u1")], b"sum-1", generation=0, counts={"num_samples": 3}) == 1
    assert store.round_state(1).counters == {"accepted": 1, "num_samples": 3}  # type: ignore[union-attr]


def test_accept_is_refused_once_the_round_closes(store: Store) -> None:
    open_first_round(store)
    store.begin_close(1, 0)

    with pytest.raises(StoreConflict, match="closing: no update is accepted"):
        store.accept(1, 0, "s1", [UpdateRef("w1", "u1")], b"sum", generation=0)


def test_accept_for_an_old_attempt_is_refused(store: Store) -> None:
    open_first_round(store)
    store.fail_round(1, 0, "window passed")
    store.open_round(1, 1, model_version=0, sampled=["w1"], required=1)

    with pytest.raises(StoreConflict, match="not the current round attempt"):
        store.accept(1, 0, "s1", [UpdateRef("w1", "u1")], b"sum", generation=0)


def test_new_attempt_accepts_an_update_the_failed_attempt_had(store: Store) -> None:
    open_first_round(store)
    store.accept(1, 0, "s1", [UpdateRef("w1", "u1")], b"sum", generation=0)
    store.fail_round(1, 0, "window passed")
    store.open_round(1, 1, model_version=0, sampled=["w1"], required=1)

    assert store.accept(1, 1, "s1", [UpdateRef("w1", "u1")], b"sum", generation=0) == 1


def test_partials_agree_with_the_ledger(store: Store) -> None:
    open_first_round(store)
    store.accept(1, 0, "s1", [UpdateRef("w1", "u1")], b"a", generation=0)
    store.accept(1, 0, "s2", [UpdateRef("w2", "u2")], b"b", generation=0)

    check_partials(1, 0, store.partials(1, 0), store.accepted(1, 0))


def test_a_partial_missing_an_accepted_update_is_detected(store: Store) -> None:
    open_first_round(store)
    store.accept(1, 0, "s1", [UpdateRef("w1", "u1")], b"a", generation=0)
    old = store.partials(1, 0)["s1"]
    store.accept(1, 0, "s1", [UpdateRef("w2", "u2")], b"ab", generation=1)

    with pytest.raises(StoreError, match=r"server s1 \(generation 1\).*missing \['u2'\]"):
        check_partials(1, 0, {"s1": old}, store.accepted(1, 0))


# -- sessions --------------------------------------------------------------------------------------


def test_session_binding_round_trips(store: Store) -> None:
    store.bind_session(Session("w-1", "ab12", "s1", "bank-a"))

    assert store.session("w-1") == Session("w-1", "ab12", "s1", "bank-a")


def test_rebinding_a_session_moves_it_to_the_new_server(store: Store) -> None:
    store.bind_session(Session("w-1", "ab12", "s1"))
    store.bind_session(Session("w-1", "ab12", "s2"))

    assert store.sessions() == [Session("w-1", "ab12", "s2")]


def test_dropped_session_is_gone(store: Store) -> None:
    store.bind_session(Session("w-1", "ab12", "s1"))
    store.drop_session("w-1")

    assert (store.session("w-1"), store.sessions()) == (None, [])


# -- leases ----------------------------------------------------------------------------------------


def test_held_lease_is_refused_to_another_holder(store: Store) -> None:
    assert store.acquire_lease("leader", "s1", ttl_s=5) is not None

    assert store.acquire_lease("leader", "s2", ttl_s=5) is None
    assert store.lease("leader").holder == "s1"  # type: ignore[union-attr]


def test_holder_asking_again_keeps_its_token(store: Store) -> None:
    first = store.acquire_lease("leader", "s1", ttl_s=5)

    assert store.acquire_lease("leader", "s1", ttl_s=5) == first


def test_expired_lease_goes_to_the_next_holder_with_a_larger_token(store: Store) -> None:
    first = store.acquire_lease("leader", "s1", ttl_s=0.1)
    time.sleep(0.25)

    second = store.acquire_lease("leader", "s2", ttl_s=5)

    assert first is not None and second is not None and second.token > first.token


def test_renewing_a_lost_lease_raises(store: Store) -> None:
    first = store.acquire_lease("leader", "s1", ttl_s=0.1)
    time.sleep(0.25)
    store.acquire_lease("leader", "s2", ttl_s=5)

    with pytest.raises(LeaseLost):
        store.renew_lease(first, ttl_s=5)  # type: ignore[arg-type]


def test_renewed_lease_outlives_its_first_ttl(store: Store) -> None:
    lease = store.acquire_lease("leader", "s1", ttl_s=0.3)
    assert lease is not None
    store.renew_lease(lease, ttl_s=5)
    time.sleep(0.4)

    assert store.lease("leader") == lease


def test_released_lease_can_be_taken_at_once(store: Store) -> None:
    lease = store.acquire_lease("leader", "s1", ttl_s=5)
    store.release_lease(lease)  # type: ignore[arg-type]

    assert store.acquire_lease("leader", "s2", ttl_s=5) is not None


def test_write_with_a_stale_lease_is_fenced_off(store: Store) -> None:
    old = store.acquire_lease("leader", "s1", ttl_s=0.1)
    store.publish_model(0, b"m0", lease=old)
    time.sleep(0.25)
    new = store.acquire_lease("leader", "s2", ttl_s=5)

    with pytest.raises(LeaseLost, match="no longer held"):
        store.open_round(1, 0, model_version=0, sampled=["w1"], required=1, lease=old)
    assert store.round_state() is None
    store.open_round(1, 0, model_version=0, sampled=["w1"], required=1, lease=new)


def test_finish_with_a_stale_lease_publishes_nothing(store: Store) -> None:
    old = store.acquire_lease("leader", "s1", ttl_s=0.2)
    store.publish_model(0, b"m0", lease=old)
    store.open_round(1, 0, model_version=0, sampled=["w1"], required=1, lease=old)
    store.begin_close(1, 0, lease=old)
    time.sleep(0.35)
    store.acquire_lease("leader", "s2", ttl_s=5)

    with pytest.raises(LeaseLost):
        store.finish_round(1, 0, model=b"m1", lease=old)
    assert store.model().version == 0  # type: ignore[union-attr]


# -- lifecycle -------------------------------------------------------------------------------------


def test_use_after_close_raises_closed_error(store: Store) -> None:
    store.close()
    store.close()

    with pytest.raises(ClosedError):
        store.config()


def test_racing_servers_accept_one_update_once(store: Store) -> None:
    # Eight servers get the same re-sent update at once: exactly one records it.
    open_first_round(store)
    outcomes: list[str] = []

    def send(server: str) -> None:
        try:
            store.accept(1, 0, server, [UpdateRef("w1", "u1")], server.encode(), generation=0)
            outcomes.append("accepted")
        except DuplicateUpdate:
            outcomes.append("duplicate")

    threads = [threading.Thread(target=send, args=(f"s{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    assert sorted(outcomes) == ["accepted"] + ["duplicate"] * 7
    assert store.round_state(1).counters["accepted"] == 1  # type: ignore[union-attr]
    check_partials(1, 0, store.partials(1, 0), store.accepted(1, 0))


def test_counts_are_added_to_the_open_attempt_only(store: Store) -> None:
    lease = store.acquire_lease("leader", "s1", 30)
    store.publish_model(0, b"m0", lease=lease)
    store.open_round(1, 0, model_version=0, sampled={"w1"}, required=1, lease=lease)

    added = store.count(1, 0, {"rejected": 2})
    stale = store.count(1, 1, {"rejected": 5})
    store.begin_close(1, 0, lease=lease)
    closing = store.count(1, 0, {"rejected": 1})

    state = store.round_state(1)
    assert (added, stale, closing) == (True, False, True)
    assert state is not None and state.counters["rejected"] == 3
