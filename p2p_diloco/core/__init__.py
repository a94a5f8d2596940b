"""The algorithm: Streaming DiLoCo in plain torch (fragments, schedule, inner and outer optimizers, merge,
codecs) and the averaging interface it reaches the network through. Never imports hivemind or the swarm."""
