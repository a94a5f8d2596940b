"""p2p-diloco: peer-to-peer training with Streaming DiLoCo over a Kademlia DHT.

The algorithm core (`streaming`, `averaging`, `codecs`, `fragments`, `config`)
never imports hivemind; `swarm` adapts hivemind to it; `cli` wires them.
"""

__version__ = "0.1.0"
