"""The host's record of who took the seats of its limited open tokens.

`p2p-diloco admit --seats N` issues a token for anyone that admits nobody by itself: each trainer that holds it
asks the host to redeem it (`swarm.seats`), and the host, which alone holds the run key, issues that trainer a
token for its own peer id (same run, same expiry) while one of the N seats is free. The ledger remembers, per
limited token, the peer ids that hold its seats, in a JSON file next to the run key (written atomically, read
back at every start of the host), so that:

* the (N+1)th identity is refused, however many times it asks and whatever the host went through in between;
* a peer that already holds a seat gets its token again (a restart with the same `--identity` takes no second
  seat);
* a damaged ledger is an error naming the file, never a silent reset (that would hand out every seat again).

This module needs no network; the host's DHT process calls `SeatLedger.redeem` for each request.
"""

from __future__ import annotations

import json
import logging
import os
import time

from .admission import MAX_PEER_ID_CHARS, AdmissionError, RunKey, Token

log = logging.getLogger(__name__)

FORMAT = 1
MAX_LEDGER_BYTES = 64 * 1024 * 1024


def ledger_path(run_key_path: str) -> str:
    """Where a run key's seat ledger lives."""
    return run_key_path + ".seats.json"


class SeatLedger:
    """The seats taken, per limited token id (hex): the peer ids holding them, in the order they came."""

    def __init__(self, path: str):
        self.path = path
        self.taken: dict[str, list[str]] = self._load()

    def _load(self) -> dict[str, list[str]]:
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_LEDGER_BYTES + 1)
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise AdmissionError(f"seat ledger {self.path}: cannot read it ({e.strerror or e})") from None
        try:
            if len(data) > MAX_LEDGER_BYTES:
                raise ValueError(f"over {MAX_LEDGER_BYTES} bytes")
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("tokens"), dict):
                raise ValueError(f"not a format-{FORMAT} ledger")
            taken = doc["tokens"]
            for token_id, peers in taken.items():
                bytes.fromhex(token_id)
                if not isinstance(peers, list) or not all(isinstance(p, str) and 0 < len(p) <= MAX_PEER_ID_CHARS
                                                          for p in peers):
                    raise ValueError(f"token {token_id}: not a list of peer ids")
        except ValueError as e:
            raise AdmissionError(f"seat ledger {self.path} is damaged ({e}); it is left as it is: move it away only "
                                 "if you mean to give every limited token's seats out again") from None
        return taken

    def _save(self) -> None:
        tmp = f"{self.path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"format": FORMAT, "tokens": self.taken}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def redeem(self, key: RunKey, run_id: str, token_text: object, peer_id: str, now: float | None = None) -> str:
        """A token for `peer_id` alone in exchange for the limited open token `token_text`, while a seat is free
        (or `peer_id` holds one already); AdmissionError naming why not. A new seat is saved before the token is
        returned."""
        now = time.time() if now is None else now
        if not isinstance(token_text, str):
            raise AdmissionError("no token")
        token = Token.parse(token_text)
        problem = token.problem(run_id, key.public, peer_id, now, redeeming=True)
        if problem is not None:
            raise AdmissionError(problem)
        if not 0 < len(peer_id) <= MAX_PEER_ID_CHARS:
            raise AdmissionError(f"a peer id of {len(peer_id)} characters")
        token_id = token.token_id.hex()
        holders = self.taken.get(token_id, [])
        if peer_id not in holders:
            if len(holders) >= token.seats:
                raise AdmissionError(f"all {token.seats} seats of this token are taken; ask the host for another")
            self.taken[token_id] = [*holders, peer_id]
            try:
                self._save()
            except OSError as e:
                self.taken[token_id] = holders
                raise AdmissionError(f"the host could not record the seat ({e.strerror or e})") from None
            log.warning("seat %d of %d of token %s… taken by peer %s", len(holders) + 1, token.seats,
                        token_id[:8], peer_id)
        return key.issue(run_id, peer_id, token.expires - now, now=now)
