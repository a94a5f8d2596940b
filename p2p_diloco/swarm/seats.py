"""Redeeming a limited open token at the host: a seat, and a token for this peer's own identity.

The host of an admission-only run serves `PROTOCOL` from its DHT process. A trainer whose `--token` is limited in
seats (`p2p-diloco admit --seats N`) asks each of its initial peers in turn, over its own DHT node, before it does
anything else in the run; the host checks the token and its seat ledger (`node.seat_ledger`) and answers with a
token for the asking peer id, which libp2p has authenticated (a peer cannot ask for a seat in another's name). The
trainer checks the answer (signed by the run's key, for its own peer id) and goes on with it; only the host holds
the run key, so only the host can answer.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial

from hivemind.p2p import PeerID

from ..node.admission import AdmissionError, RunKey, Token
from ..node.seat_ledger import SeatLedger
from .framing import read_message, write_message
from .reachability import peer_ids_of

log = logging.getLogger(__name__)

PROTOCOL = "/p2p-diloco/seats/1.0.0"
MAX_MESSAGE = 4096  # bytes of a request or an answer (a token is ~250 characters)
TIMEOUT_S = 10.0


async def _handle(key: RunKey, run_id: str, ledger: SeatLedger, info, reader, writer) -> None:
    try:
        request = await asyncio.wait_for(read_message(reader, MAX_MESSAGE, "seat request"), TIMEOUT_S)
        token = request.get("token") if isinstance(request, dict) else None
        try:
            answer = {"token": ledger.redeem(key, run_id, token, str(info.peer_id))}
        except AdmissionError as e:
            log.warning("refused a seat to peer %s: %s", info.peer_id, e)
            answer = {"error": str(e)}
        await asyncio.wait_for(write_message(writer, answer), TIMEOUT_S)
    except Exception as e:  # a malformed request from a stranger: answer nothing
        log.debug("seat request from %s dropped: %r", info.peer_id, e)
    finally:
        writer.close()


async def _serve(run_key_path: str, run_id: str, ledger_path: str, dht, node) -> None:
    key, ledger = RunKey.load(run_key_path), SeatLedger(ledger_path)
    await node.p2p.add_binary_stream_handler(PROTOCOL, partial(_handle, key, run_id, ledger))


def serve(dht, run_key_path: str, run_id: str, ledger_path: str) -> None:
    """Redeem limited tokens for run `run_id` from now on, in the DHT's process, recording seats in
    `ledger_path`; AdmissionError when the key or the ledger cannot be read (checked here first)."""
    RunKey.load(run_key_path), SeatLedger(ledger_path)
    dht.run_coroutine(partial(_serve, run_key_path, run_id, ledger_path))


async def _ask(initial_peers: list[str], token: str, dht, node) -> tuple[str | None, list[str], list[str]]:
    """(a token for this node, the hosts' refusals, the peers that could not be asked)."""
    refusals, errors = [], []
    for host in dict.fromkeys(peer_ids_of(initial_peers)):
        try:
            async def exchange():
                _, reader, writer = await node.p2p.call_binary_stream_handler(PeerID.from_base58(host), PROTOCOL)
                try:
                    await write_message(writer, {"token": token})
                    return await read_message(reader, MAX_MESSAGE, "seat answer")
                finally:
                    writer.close()
            answer = await asyncio.wait_for(exchange(), TIMEOUT_S)
        except Exception as e:
            errors.append(f"{host}: {type(e).__name__}: {e}".rstrip(": "))
            continue
        if isinstance(answer, dict) and isinstance(answer.get("token"), str):
            return answer["token"], refusals, errors
        reason = answer.get("error") if isinstance(answer, dict) else None
        if isinstance(reason, str):
            refusals.append(reason[:500])
        else:
            errors.append(f"{host}: a malformed answer")
    return None, refusals, errors


def redeem(dht, initial_peers: list[str], token: str) -> str:
    """A token for this DHT node's own peer id in exchange for the limited open `token`, asked of the initial
    peers in turn (the host answers); AdmissionError naming every refusal otherwise."""
    limited = Token.parse(token)
    mine, refusals, errors = dht.run_coroutine(partial(_ask, list(initial_peers), token))
    if mine is None and refusals:
        raise AdmissionError(f"the host refused this peer a seat: {refusals[0]}")
    if mine is None:
        raise AdmissionError("could not redeem the token's seat at the host (--initial-peers must name the host: "
                             "only it can): " + ("; ".join(errors) or "no peer id in --initial-peers to ask"))
    try:
        problem = Token.parse(mine).problem(limited.run_id, limited.run_key, str(dht.peer_id))
    except AdmissionError as e:
        problem = str(e)
    if problem is not None:
        raise AdmissionError(f"the host's answer to the seat request is not a token for this peer: {problem}")
    return mine
