"""Tests for enclavefl.cluster.assignment and the scheduler's cluster routes."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

from enclavefl.cluster import Member, MemoryStore
from enclavefl.cluster.assignment import assign, balance
from enclavefl.cluster.routes import mount
from enclavefl.cluster.scheduler import ClusterHandle, Scheduler
from tests.unit.cluster.cluster_job import cluster_job
from tests.unit.management.live import TOKEN, app_for, serving


def servers(n: int) -> list[Member]:
    return [Member(f"server-{i}", "server", f"127.0.0.1:{7000 + i}") for i in range(n)]


def test_every_worker_gets_every_server_once_in_a_fixed_order() -> None:
    first = assign("worker-3", servers(3))

    assert sorted(m.member_id for m in first) == ["server-0", "server-1", "server-2"]
    assert assign("worker-3", list(reversed(servers(3)))) == first


def test_a_server_leaving_moves_only_its_own_workers() -> None:
    # Prepare
    names = [f"worker-{i}" for i in range(40)]
    before = {w: assign(w, servers(4))[0].member_id for w in names}

    # Execute: server-2 leaves.
    after = {w: assign(w, [m for m in servers(4) if m.member_id != "server-2"])[0].member_id for w in names}

    # Assert: a worker moves only if server-2 was its server, and then to its first alternative.
    moved = {w for w in names if before[w] != after[w]}
    assert moved == {w for w in names if before[w] == "server-2"}
    assert all(after[w] == assign(w, servers(4))[1].member_id for w in moved)


def test_balance_gives_no_server_more_than_its_share_where_hashing_alone_leaves_servers_empty() -> None:
    names = [f"worker-{i}" for i in range(8)]
    hashed = {assign(w, servers(4))[0].member_id for w in names}

    placed = balance(names, servers(4))

    # 8 workers by hashing alone use only 2 of the 4 servers (worker-0..7 with these ids, computed once).
    assert len(hashed) == 2
    loads = [sum(order[0].member_id == m.member_id for order in placed.values()) for m in servers(4)]
    assert loads == [2, 2, 2, 2]
    # Each worker still gets every server once, its alternatives in its own rendezvous order.
    for w, order in placed.items():
        assert sorted(m.member_id for m in order) == [m.member_id for m in servers(4)]
        assert order[1:] == [m for m in assign(w, servers(4)) if m.member_id != order[0].member_id]


def test_two_servers_added_to_two_take_only_the_workers_they_must() -> None:
    names = [f"worker-{i}" for i in range(40)]

    before = {w: o[0].member_id for w, o in balance(names, servers(2)).items()}
    after = {w: o[0].member_id for w, o in balance(names, servers(4)).items()}

    # 20 of 40 must move to fill the two new servers; no worker moves between the two old ones.
    moved = [w for w in names if before[w] != after[w]]
    assert len(moved) == 20
    assert all(after[w] in ("server-2", "server-3") for w in moved)


def test_the_servers_route_names_the_leader(tmp_path: Path) -> None:
    store = MemoryStore()
    for m in servers(2):
        store.register(m, 30)
    store.acquire_lease("leader", "server-1", 30)
    handle = ClusterHandle(Scheduler(cluster_job(rounds=1, workers=2), store, out_dir=tmp_path))

    with serving(app_for(handle, [mount])) as api:
        status, _, body = api.get("/api/v1/cluster/servers", {"authorization": f"Bearer {TOKEN}"})

    assert status == 200
    assert json.loads(body) == {"servers": [{"id": "server-0", "address": "127.0.0.1:7000"},
                                            {"id": "server-1", "address": "127.0.0.1:7001"}], "leader": "server-1"}


def test_the_assignment_route_names_a_server_and_its_alternatives(tmp_path: Path) -> None:
    # Prepare
    store = MemoryStore()
    for m in servers(3):
        store.register(m, 30)
    handle = ClusterHandle(Scheduler(cluster_job(rounds=1, workers=2), store, out_dir=tmp_path))

    # Execute
    with serving(app_for(handle, [mount])) as api:
        status, _, body = api.get("/api/v1/cluster/assignment/worker-7", {"authorization": f"Bearer {TOKEN}"})
        refused, _, _ = api.get("/api/v1/cluster/servers")

    # Assert
    assert status == 200 and refused == 401
    answer = json.loads(body)
    expected = [m.member_id for m in assign("worker-7", servers(3))]
    assert [answer["server"]["id"], *(a["id"] for a in answer["alternatives"])] == expected


def _post(url: str, body: dict[str, int], token: str | None) -> tuple[int, dict[str, object]]:
    headers = {"content-type": "application/json"} | ({"authorization": f"Bearer {token}"} if token else {})
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read() or b"{}")


def test_the_scale_route_drains_with_the_token_and_says_what_it_cannot_do(tmp_path: Path) -> None:
    # Prepare
    store = MemoryStore()
    for m in servers(3):
        store.register(m, 30)
    handle = ClusterHandle(Scheduler(cluster_job(rounds=1, workers=2), store, out_dir=tmp_path))

    # Execute
    with serving(app_for(handle, [mount], public_read=True)) as api:
        anonymous, _ = _post(api.url + "/api/v1/scale", {"servers": 2}, None)
        status, answer = _post(api.url + "/api/v1/scale", {"servers": 2}, TOKEN)
        refused, why = _post(api.url + "/api/v1/scale", {"servers": 5}, TOKEN)
        invalid, _ = _post(api.url + "/api/v1/scale", {"servers": 0}, TOKEN)

    # Assert
    assert anonymous == 401
    assert status == 200 and answer["draining"] == ["server-2"]
    assert refused == 422 and "starts no servers" in str(why["detail"])
    assert invalid == 422
