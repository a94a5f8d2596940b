"""Fixtures of the swarm tests."""

from __future__ import annotations

import pytest

from p2p_diloco.swarm.dht import start_dht, visible_maddrs


@pytest.fixture
def dhts():
    """`dhts(n)`: n DHT nodes on loopback, each joined through the first; all shut down afterwards."""
    started = []

    def make(n: int):
        first = start_dht()
        started.append(first)
        for _ in range(n - 1):
            started.append(start_dht(visible_maddrs(first)))
        return started[-n:]

    yield make
    for d in started:
        d.shutdown()
