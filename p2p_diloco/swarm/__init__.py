"""The swarm: hivemind (DHT, libp2p, matchmaking) adapted to the algorithm's averaging interface, and the
processes that use it (a host, a trainer peer, a whole local swarm)."""
