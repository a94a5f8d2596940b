"""Admission in the swarm: whom an averager's process lets into its groups and serves state to.

A run with a run key (`node.admission`) admits the peers whose join token, presented in their progress record
(signed by that peer: `signed_records`) or in their round metadata, admits their peer id now. An averager's
process (one per fragment) checks:

* a member asking to join the group it leads (`rpc_join_group`): the token in its metadata;
* the leaders it asks to join (hivemind's matchmaking reads them from the DHT): their progress records' tokens,
  so that an honest peer never joins a group an unadmitted peer leads;
* every member of a group before the all-reduce begins (`butterfly.read_group`): every member's token;
* a peer that downloads this fragment's state (`rpc_download_state`): its progress record's token.

The training process filters the progress records the same way (`peer._live`): only admitted peers are live, so
only their state hashes count as votes and only they are asked for state.
"""

from __future__ import annotations

import logging
import time

from ..node.admission import Admission
from ..node.records import PeerProgress, RecordError

log = logging.getLogger(__name__)

REFRESH_S = 2.0  # an averager process re-reads the run's progress records (tokens) at most this often
LOOKUP_TIMEOUT_S = 5.0


class AdmittedPeers:
    """The peers of a run that its progress records show admitted, as one averager's process reads them."""

    def __init__(self, admission: Admission):
        self.admission = admission
        self._admitted: set[str] = set()
        self._read_at = -1e9
        self._refused: set[tuple[str, str]] = set()  # (peer, what) refusals logged

    def refuse(self, peer_id: str, what: str, problem: str) -> None:
        """Log once per peer that it was refused `what` (e.g. "a place in this peer's group") and why."""
        if (peer_id, what) not in self._refused:
            self._refused.add((peer_id, what))
            log.warning("refusing peer %s %s: it is not admitted to this run (%s); logged once per fragment",
                        peer_id, what, problem)

    def metadata_problem(self, gather: bytes, serializer, peer_id: str) -> str | None:
        """Why the round metadata `gather` (hivemind's: bandwidth, mode, ours) does not admit `peer_id`."""
        try:
            _, _, user = serializer.loads(gather)
            token = serializer.loads(user).get("token")
        except Exception:
            return "malformed round metadata"
        return self.admission.problem(token, peer_id)

    async def admits(self, dht, peer_id: str) -> bool:
        """Whether `peer_id`'s latest progress record carries a token that admits it (re-read at most every
        REFRESH_S; a peer not seen yet triggers a read at most that often)."""
        if peer_id in self._admitted:
            return True
        if time.monotonic() - self._read_at >= REFRESH_S:
            self._read_at = time.monotonic()
            try:
                found = await dht.get(f"{self.admission.run_id}_progress", latest=True, return_future=True)
            except Exception as e:  # a failed lookup: nobody new is admitted until the next one
                log.debug("reading the run's progress records: %r", e)
                return False
            self._admitted = self.from_progress(found)
        return peer_id in self._admitted

    def from_progress(self, found) -> set[str]:
        """The admitted peer ids among the progress records of a DHT lookup."""
        admitted = set()
        if found is None or not isinstance(found.value, dict):
            return admitted
        for subkey, item in found.value.items():
            try:
                record = PeerProgress.decode(item.value)
            except RecordError:
                continue
            if record.peer_id == subkey and self.admission.problem(record.token, record.peer_id) is None:
                admitted.add(record.peer_id)
        return admitted
