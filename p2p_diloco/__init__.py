"""p2p-diloco: peer-to-peer training with Streaming DiLoCo over a Kademlia DHT.

Rooms, in import order: `core` (the algorithm, plain torch) never imports
hivemind or anything below; `task` (the embedded model, data, simulator) and
`node` (records, profiles, checkpoints, failpoints) build on it; `swarm` adapts
hivemind to the core; `emulation` makes networks on one machine; `cli` wires them.
"""

__version__ = "0.1.0"
