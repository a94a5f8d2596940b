"""A peer keeps publishing its progress while averaging holds its step loop up and at the end of a run, so the
others still count it live (they wait for it, count its vote and serve it their state) until it is done."""

from __future__ import annotations

import time
from types import SimpleNamespace

from p2p_diloco.swarm import peer as peer_module
from p2p_diloco.swarm.peer import Peer


class _DHT:
    def __init__(self, fail: bool = False):
        self.stores: list[tuple[str, str]] = []
        self.fail = fail

    def store(self, key, value, expiration_time, subkey, return_future):
        if self.fail:
            raise RuntimeError("the DHT is shutting down")
        self.stores.append((key, subkey))


def _peer(dht: _DHT) -> Peer:
    peer = Peer.__new__(Peer)  # only what the heartbeat touches
    peer.dht, peer.run, peer.published = dht, SimpleNamespace(run_id="run"), 0.0
    peer.silent_for = peer_module.PROGRESS_EVERY_S  # (as at the end of a run)
    peer._progress = lambda now: SimpleNamespace(peer_id="me", encode=lambda: b"progress")
    return peer


def test_a_peer_held_up_or_finishing_publishes_its_progress_until_it_is_done(monkeypatch):
    monkeypatch.setattr(peer_module, "PROGRESS_EVERY_S", 0.05)
    peer = _peer(_DHT())
    with peer.heartbeat():
        time.sleep(0.6)  # the step loop publishes nothing (held up, or over)
    published = len(peer.dht.stores)
    assert published >= 4 and set(peer.dht.stores) == {("run_progress", "me")}
    time.sleep(0.3)
    assert len(peer.dht.stores) == published  # it stopped with the block


def test_the_heartbeat_is_quiet_while_the_step_loop_publishes(monkeypatch):
    monkeypatch.setattr(peer_module, "PROGRESS_EVERY_S", 0.1)
    peer = _peer(_DHT())
    with peer.heartbeat():
        for _ in range(10):  # the step loop's own records, every 0.05 s
            peer.published = time.time()
            time.sleep(0.05)
    assert peer.dht.stores == []


def test_a_heartbeat_that_cannot_publish_ends_quietly(monkeypatch):
    monkeypatch.setattr(peer_module, "PROGRESS_EVERY_S", 0.01)
    peer = _peer(_DHT(fail=True))
    with peer.heartbeat():
        time.sleep(0.1)  # (the block runs on; no exception reaches it)
