"""Fixtures of the swarm tests."""

from __future__ import annotations

import pytest

from p2p_diloco.swarm.dht import start_dht, visible_maddrs


@pytest.fixture
def dhts():
    """`dhts(n, initial_peers=None, **start_dht's options)`: n DHT nodes on loopback, the first joined through
    `initial_peers`, each other through the first; all shut down afterwards."""
    started = []

    def make(n: int, initial_peers: list[str] | None = None, **options):
        first = start_dht(initial_peers, **options)
        started.append(first)
        for _ in range(n - 1):
            started.append(start_dht(visible_maddrs(first), **options))
        return started[-n:]

    yield make
    for d in started:
        d.shutdown()
