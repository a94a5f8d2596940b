"""A node's plumbing: records on the wire and in the DHT, peer profiles, checkpoints, failpoints."""
