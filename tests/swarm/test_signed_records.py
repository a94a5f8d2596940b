"""Records signed by the peer they name (`swarm.signed_records`): forged, foreign and replayed ones refused."""

from __future__ import annotations

import dataclasses
import time

import hivemind
import msgpack
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import P2P, PeerID
from hivemind.utils import get_dht_time

from p2p_diloco.node.records import PeerProgress
from p2p_diloco.swarm.dht import fetch_progress, publish_progress, visible_maddrs
from p2p_diloco.swarm.signed_records import SignedRecords, load_identity, peer_id_of


def _until(predicate, timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _steps(dht, run="r") -> dict[str, int]:
    return {p.peer_id: p.step for p in fetch_progress(dht, run)}


def test_only_the_peer_a_record_names_can_publish_it(dhts):
    a, b = dhts(2)
    me, other = str(a.peer_id), str(b.peer_id)
    publish_progress(a, "r", PeerProgress(me, 5))
    _until(lambda: _steps(b, "r").get(me) == 5, what="a's own signed record never showed")
    # b publishes under a's peer id, later: refused everywhere, a's record stands
    publish_progress(b, "r", PeerProgress(me, 999))
    publish_progress(b, "r", PeerProgress(other, 7))  # (b's own record goes through)
    _until(lambda: _steps(a, "r").get(other) == 7, what="b's own record never showed")
    assert _steps(a, "r")[me] == 5 and _steps(b, "r")[me] == 5


def test_a_stock_hivemind_node_cannot_plant_an_unsigned_record_under_a_peer_id(dhts):
    a, b = dhts(2)
    me = str(a.peer_id)
    publish_progress(a, "r", PeerProgress(me, 5))
    _until(lambda: _steps(b, "r").get(me) == 5, what="a's record never showed")
    stranger = hivemind.DHT(start=True, initial_peers=visible_maddrs(a), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        forged = PeerProgress(me, 10_000).encode()
        stranger.store("r_progress", forged, expiration_time=get_dht_time() + 120, subkey=me)
        time.sleep(1.5)
        assert _steps(a, "r")[me] == 5 and _steps(b, "r")[me] == 5
    finally:
        stranger.shutdown()


def _record(validator: SignedRecords, me: str, value: bytes, expiration: float) -> DHTRecord:
    record = DHTRecord(b"key-id", msgpack.packb(me), msgpack.packb(value), expiration)
    return dataclasses.replace(record, value=validator.sign_value(record))


def test_a_record_altered_replayed_with_another_expiration_or_of_another_key_fails(tmp_path):
    path = tmp_path / "identity.key"
    P2P.generate_identity(str(path))
    validator = SignedRecords(str(path))
    me = validator.load()
    public = load_identity(str(path)).public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert me == peer_id_of(public) == str(PeerID.from_identity(path.read_bytes()))
    good = _record(validator, me, b"round 4", 1000.0)
    assert validator.validate(good) and validator.strip_value(good) == msgpack.packb(b"round 4")
    checker = SignedRecords()  # another node: checks, signs nothing
    assert checker.validate(good)
    assert not checker.validate(dataclasses.replace(good, expiration_time=2000.0))  # replayed as newer
    assert not checker.validate(dataclasses.replace(good, key=b"another-key"))
    tampered = bytearray(good.value)
    tampered[30] ^= 1
    assert not checker.validate(dataclasses.replace(good, value=bytes(tampered)))
    assert not checker.validate(dataclasses.replace(good, subkey=msgpack.packb("QmSomeoneElse")))
    assert "signed by another peer" in SignedRecords.problem(good, "QmSomeoneElse")
    unsigned = DHTRecord(b"key-id", msgpack.packb(me), msgpack.packb(b"round 4"), 1000.0)
    assert checker.sign_value(unsigned) == unsigned.value  # not its record: left unsigned
    assert SignedRecords.problem(unsigned, me) == "not signed" and not checker.validate(unsigned)
    for garbage in (b"", b"\xc1", msgpack.packb([b"p2p-diloco-signed/1", b"v", b"not a key", b"sig"]), b"x" * 70_000):
        assert not checker.validate(dataclasses.replace(good, value=garbage))
    # records without a string subkey (the run config, hivemind's own) are not ours to judge
    assert checker.validate(DHTRecord(b"key-id", b"", b"anything", 1.0))
    assert checker.validate(DHTRecord(b"key-id", msgpack.packb(b"\x00peer"), b"anything", 1.0))
