"""The secure-aggregation round in process: exact sums with dropouts, and every refusal."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from enclavefl.errors import ProtocolError, RoundError
from enclavefl.privacy.secagg import (
    KeyAdvert,
    MaskedInput,
    RoundTag,
    SecAggClient,
    SecAggParams,
    SecAggServer,
    ShareCiphertext,
    UnmaskRequest,
)

PARAMS = SecAggParams(threshold=0.67, quantization_bits=16, clip_range=4.0, rounding="deterministic")
LENGTH = 50


class Identities:
    """Each worker's ECDSA P-256 key (its attested key) and a verifier over the public halves."""

    def __init__(self, ids: list[str]) -> None:
        self.keys = {u: ec.generate_private_key(ec.SECP256R1()) for u in ids}

    def signer(self, worker: str):  # type: ignore[no-untyped-def]
        key = self.keys[worker]
        return lambda payload: key.sign(payload, ec.ECDSA(hashes.SHA256()))

    def verify(self, worker: str, payload: bytes, signature: bytes) -> bool:
        key = self.keys.get(worker)
        if key is None:
            return False
        try:
            key.public_key().verify(signature, payload, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return False
        return True


def make_round(n: int, params: SecAggParams = PARAMS, round_number: int = 1):  # type: ignore[no-untyped-def]
    ids = [f"worker-{i:02d}" for i in range(n)]
    who = Identities(ids)
    tag = RoundTag(round_number, os.urandom(16))
    clients = {u: SecAggClient(u, tag, params, who.signer(u), who.verify) for u in ids}
    server = SecAggServer(tag, params, ids, who.verify, LENGTH)
    return ids, who, tag, clients, server


def run_to_unmask(n: int, drop_after_share: int, params: SecAggParams = PARAMS):  # type: ignore[no-untyped-def]
    """Advertise, share, and upload with the last ``drop_after_share`` workers silent after sharing."""
    ids, who, tag, clients, server = make_round(n, params)
    for c in clients.values():
        server.receive_advert(c.advertise())
    roster = server.roster()
    for u, c in clients.items():
        server.receive_shares(u, c.share(roster))
    inboxes = server.inboxes()
    rng = np.random.default_rng(5)
    inputs = {u: (rng.uniform(-1, 1, LENGTH), int(rng.integers(1, 50))) for u in ids}
    survivors = ids[: n - drop_after_share]
    for u in survivors:
        server.receive_masked(clients[u].upload(inboxes[u], *inputs[u]))
    return ids, clients, server, inputs, survivors


def plain_sum(inputs, survivors):  # type: ignore[no-untyped-def]
    grid = PARAMS.fixed_point()
    total = np.zeros(LENGTH + 1, dtype=np.uint32)
    for u in survivors:
        total += grid.encode(*inputs[u], np.random.default_rng(0))
    return grid.decode_sum(total)


def test_server_recovers_exactly_the_survivors_sum_after_three_drop() -> None:
    ids, clients, server, inputs, survivors = run_to_unmask(10, drop_after_share=3)
    request = server.unmask_request()
    assert request.dropped == tuple(ids[7:])
    for u in survivors:
        server.receive_unmask(clients[u].unmask(request))
    result = server.finish()
    expected_sum, expected_weight = plain_sum(inputs, survivors)
    # Deterministic rounding: the masked path decodes to exactly the plain quantized sum.
    np.testing.assert_array_equal(result.weighted_sum, expected_sum)
    assert result.total_weight == expected_weight == sum(inputs[u][1] for u in survivors)
    plain_mean = sum(w * x for x, w in (inputs[u] for u in survivors)) / expected_weight
    np.testing.assert_allclose(result.mean, plain_mean, atol=PARAMS.fixed_point().max_error())


def test_sparse_graph_round_recovers_the_sum() -> None:
    # 40 workers, 6 neighbours each (SecAgg+), 7 holders, t = ceil(0.67 * 7) = 5. With 2 dropped,
    # every secret keeps at least 5 live holders whatever the random graph is.
    params = dataclasses.replace(PARAMS, neighbours=6)
    ids, clients, server, inputs, survivors = run_to_unmask(40, drop_after_share=2, params=params)
    assert len(server.neighbours(ids[0])) == 6
    request = server.unmask_request()
    for u in survivors:
        server.receive_unmask(clients[u].unmask(request))
    np.testing.assert_array_equal(server.finish().weighted_sum, plain_sum(inputs, survivors)[0])


def test_fewer_survivors_than_threshold_unmasks_nothing() -> None:
    # 5 workers, complete graph: 5 holders per secret, t = ceil(0.67 * 5) = 4; only 2 upload.
    _, _, server, _, _ = run_to_unmask(5, drop_after_share=3)
    assert server.threshold == 4
    with pytest.raises(RoundError, match="no mask is removed"):
        server.unmask_request()
    with pytest.raises(ProtocolError, match="stage done"):
        server.finish()


def test_survivor_shares_below_threshold_keep_the_sum_masked() -> None:
    ids, clients, server, _, survivors = run_to_unmask(10, drop_after_share=2)
    request = server.unmask_request()
    for u in survivors[:5]:  # t = ceil(0.67 * 10) = 7 replies are needed
        server.receive_unmask(clients[u].unmask(request))
    with pytest.raises(RoundError, match="the sum stays masked"):
        server.finish()


def test_worker_refuses_to_reveal_both_shares_of_one_peer() -> None:
    ids, clients, server, _, survivors = run_to_unmask(6, drop_after_share=1)
    honest = server.unmask_request()
    greedy = UnmaskRequest(honest.tag, honest.survivors, honest.dropped + (survivors[1],))
    with pytest.raises(ProtocolError, match="both the seed and the key shares"):
        clients[survivors[0]].unmask(greedy)


def test_worker_answers_one_unmask_request_only() -> None:
    ids, clients, server, _, survivors = run_to_unmask(6, drop_after_share=1)
    request = server.unmask_request()
    clients[survivors[0]].unmask(request)
    # A second question with survivors and dropped swapped around would reveal both kinds.
    other = UnmaskRequest(request.tag, tuple(u for u in request.survivors if u != survivors[1]), (survivors[1],))
    with pytest.raises(ProtocolError, match="asked to unmask in stage done"):
        clients[survivors[0]].unmask(other)


def test_worker_refuses_unmask_with_fewer_survivors_than_threshold() -> None:
    ids, clients, server, _, survivors = run_to_unmask(6, drop_after_share=1)
    request = server.unmask_request()
    tiny = UnmaskRequest(request.tag, (survivors[0],), tuple(u for u in ids if u != survivors[0]))
    with pytest.raises(ProtocolError, match="nothing is revealed"):
        clients[survivors[0]].unmask(tiny)


def test_forged_advert_signature_is_refused() -> None:
    ids, who, tag, clients, server = make_round(4)
    advert = clients[ids[0]].advertise()
    forged = dataclasses.replace(advert, mask_public=os.urandom(32))  # a MITM's own key
    with pytest.raises(ProtocolError, match="not signed by its attested key"):
        server.receive_advert(forged)


def test_advert_replayed_from_another_round_is_refused() -> None:
    ids, who, _, old_clients, _ = make_round(4)
    old = old_clients[ids[0]].advertise()
    # Same workers and keys, next round attempt: the old signature covers the old tag.
    server = SecAggServer(RoundTag(2, os.urandom(16)), PARAMS, ids, who.verify, LENGTH)
    with pytest.raises(ProtocolError, match="forged or replayed"):
        server.receive_advert(old)


def test_advert_replayed_under_another_sender_is_refused() -> None:
    ids, who, tag, clients, server = make_round(4)
    advert = clients[ids[0]].advertise()
    with pytest.raises(ProtocolError, match="forged or replayed"):
        server.receive_advert(dataclasses.replace(advert, sender=ids[1]))


def test_worker_refuses_roster_that_swaps_its_own_keys() -> None:
    ids, who, tag, clients, server = make_round(4)
    for c in clients.values():
        server.receive_advert(c.advertise())
    roster = server.roster()
    other = SecAggClient(ids[0], tag, PARAMS, who.signer(ids[0]), who.verify).advertise()
    swapped = dataclasses.replace(roster, adverts=(other, *roster.adverts[1:]))
    with pytest.raises(ProtocolError, match="own keys unchanged"):
        clients[ids[0]].share(swapped)


def test_worker_refuses_roster_with_an_unsigned_key() -> None:
    ids, who, tag, clients, server = make_round(4)
    for c in clients.values():
        server.receive_advert(c.advertise())
    roster = server.roster()
    bad = dataclasses.replace(roster.adverts[1], enc_public=os.urandom(32))
    tampered = dataclasses.replace(roster, adverts=(roster.adverts[0], bad, *roster.adverts[2:]))
    with pytest.raises(ProtocolError, match="not signed"):
        clients[ids[0]].share(tampered)


def _shared_round(n: int):  # type: ignore[no-untyped-def]
    ids, who, tag, clients, server = make_round(n)
    for c in clients.values():
        server.receive_advert(c.advertise())
    roster = server.roster()
    for u, c in clients.items():
        server.receive_shares(u, c.share(roster))
    return ids, clients, server.inboxes()


def test_forged_share_ciphertext_is_refused() -> None:
    ids, clients, inboxes = _shared_round(4)
    packets = inboxes[ids[0]]
    flipped = bytearray(packets[0].sealed)
    flipped[20] ^= 0x01
    forged = [dataclasses.replace(packets[0], sealed=bytes(flipped)), *packets[1:]]
    with pytest.raises(ProtocolError, match="tag mismatch"):
        clients[ids[0]].upload(forged, np.zeros(LENGTH), 1)


def test_share_replayed_under_another_sender_is_refused() -> None:
    ids, clients, inboxes = _shared_round(4)
    packets = inboxes[ids[0]]
    # The PS relabels the share from packets[0].sender as coming from packets[1].sender.
    relabelled = [ShareCiphertext(packets[1].sender, ids[0], packets[0].sealed),
                  ShareCiphertext(packets[0].sender, ids[0], packets[1].sealed), *packets[2:]]
    with pytest.raises(ProtocolError, match="refused"):
        clients[ids[0]].upload(relabelled, np.zeros(LENGTH), 1)


def test_server_refuses_incomplete_share_bundle_and_strangers() -> None:
    ids, who, tag, clients, server = make_round(4)
    for c in clients.values():
        server.receive_advert(c.advertise())
    roster = server.roster()
    packets = clients[ids[0]].share(roster)
    with pytest.raises(ProtocolError, match="one share to each"):
        server.receive_shares(ids[0], packets[:-1])
    with pytest.raises(ProtocolError, match="another sender's name"):
        server.receive_shares(ids[1], packets)
    with pytest.raises(ProtocolError, match="not a participant"):
        server.receive_masked(MaskedInput("intruder", np.zeros(LENGTH + 1, np.uint32)))


def test_second_masked_upload_is_refused() -> None:
    ids, clients, server, inputs, survivors = run_to_unmask(4, drop_after_share=1)
    with pytest.raises(ProtocolError, match="second masked input"):
        server.receive_masked(MaskedInput(survivors[0], np.zeros(LENGTH + 1, np.uint32)))


def test_one_masked_upload_is_uniform_and_uncorrelated_with_the_update() -> None:
    params = dataclasses.replace(PARAMS, quantization_bits=16)
    ids, who, tag, clients, server = make_round(3, params)
    for c in clients.values():
        server.receive_advert(c.advertise())
    roster = server.roster()
    for u, c in clients.items():
        server.receive_shares(u, c.share(roster))
    update = np.linspace(-4, 4, 64_000)  # a strongly structured update
    masked = clients[ids[0]].upload(server.inboxes()[ids[0]], update, 1).vector[:-1]
    # Top 4 bits over 16 bins, 64k words: chi-square (15 dof) < 37.7 at p = 0.001.
    counts = np.bincount(masked >> 28, minlength=16)
    expected = len(masked) / 16
    assert float(np.sum((counts - expected) ** 2 / expected)) < 37.7
    # Correlation with the plain update: |r| < 4 / sqrt(64000) ~ 0.016 (4 standard errors).
    r = np.corrcoef(masked.astype(np.float64), update)[0, 1]
    assert abs(r) < 0.016
