"""The core's `FragmentAverager` over hivemind: its DHT and matchmaking, our codecs and our butterfly.

Why not hivemind's own all-reduce (SPEC.md §3, measured): its tensors travel
through a closed protobuf enum, so our codecs cannot; a failed sender or reducer
is dropped silently and `step()` still "succeeds"; and it adds each peer's delta
to its own unquantized tensor, so peers end with different values. We keep
hivemind's matchmaking (one `DecentralizedAverager` per fragment, group bits =
the round, so a group only ever holds one run, fragment and round) and replace
the rest with two protocols, each in its own module:

* `butterfly.ButterflyProtocol`: the all-reduce of one round (all or nothing);
* `state_serving.StateServing`: publishing, serving and fetching the agreed
  state of a round, for a peer that missed it.

Guarantees: a round's `result()` is either the mean every member of its group
received (bit-identical everywhere) or AveragingFailed; a recovered state is
returned only if it hashes to the agreed digest. A crash of this peer's
averager processes takes nothing else down (they die with the peer, and the
others' rounds fail over to their next round).
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import threading
import time
from collections import Counter
from concurrent.futures import Future
from typing import AsyncIterator

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.p2p import P2PContext
from hivemind.proto import averaging_pb2
from hivemind.utils.mpfuture import MPFuture

from ..core.averaging import (AgreedState, AveragingFailed, FragmentAverage, FragmentAverager, PendingAverage,
                              RoundKey, RoundReport)
from ..core.codecs import get_codec
from ..core.config import AUTO_CODEC
from ..core.round_subset import subset_size
from ..node import attacks
from ..node.admission import Admission
from ..node.failpoints import reached
from . import inbound
from .admitted import AdmittedPeers
from .audit import AuditProtocol, ReducerCaught
from .butterfly import DEADLINE_FLOOR_S, FLOOR_RATE, ButterflyProtocol
from .lifetime import die_with_parent
from .link_meter import LinkMeter
from .state_serving import (StateServing, decode_state, hash_records, hashes_key, others_records, parse_hash_records,
                            publish_hash, read_hash_records)

log = logging.getLogger(__name__)


class Shunned(set):
    """The peers an averager's process has nothing to do with: those it caught lying (the set's members, for the
    run) and those its inbound limits dropped for flooding it (`inbound`, for a while): no group, no state."""

    def __contains__(self, peer) -> bool:
        return set.__contains__(self, peer) or inbound.INBOUND.is_dropped(peer)


ASSEMBLY_GRACE_S = 1.0  # how long past its search's deadline a leader waits for the group assembled at it


class _PastTheDeadline:
    """hivemind's StepControl as matchmaking reads it, whose wait for a group ends `grace` s past the deadline (its
    declarations still end at the deadline)."""

    def __init__(self, step, grace: float):
        self._step, self._grace = step, grace

    def get_timeout(self):
        timeout = self._step.get_timeout()
        return None if timeout is None else timeout + self._grace

    def __getattr__(self, name):
        return getattr(self._step, name)


class CodecAverager(ButterflyProtocol, AuditProtocol, StateServing, DecentralizedAverager):
    """One fragment's averager process. Every peer of a run must use this class (RPC names embed it)."""

    _rpc_handlers = None  # hivemind collects rpc_* per class; a subclass must not inherit the parent's list

    def __init__(self, numel: int, codec_name: str, paced_uplink: float = 0.0, admission: Admission | None = None,
                 state_numel: int | None = None, **kwargs):
        """`numel`: the values a round averages; `state_numel`: the fragment's (its served state; None: `numel`,
        they differ with a `sync_stride`). `admission`: the run's (`node.admission`); None: a run that admits
        anyone."""
        self.codec_name = codec_name
        self.numel = numel
        self.state_numel = numel if state_numel is None else state_numel
        self.paced_uplink = paced_uplink
        self.admitted = AdmittedPeers(admission) if admission is not None else None
        self.banned = Shunned()  # peers this peer caught lying (`_ban`): no group, no state, for the run
        self._leaders_filtered = False
        self._streams_opened = {}  # member -> (event loop) time of the latest stream it opened to this peer
        inbound.install()  # (before the averager's process forks)
        super().__init__([torch.zeros(numel, dtype=torch.float32)], **kwargs)

    def run(self):
        die_with_parent()
        super().run()

    async def rpc_join_group(self, request: averaging_pb2.JoinRequest, context: P2PContext
                             ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        if str(context.remote_id) in self.banned:
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        if self.admitted is not None:
            problem = self.admitted.metadata_problem(request.gather, self.serializer, str(context.remote_id))
            if problem is not None:
                self.admitted.refuse(str(context.remote_id), "a place in a group this peer leads", problem)
                yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
                return
        async for response in super().rpc_join_group(request, context):
            yield response
            reached("matchmaking")

    async def _step(self, **kwargs):
        if not self._leaders_filtered:
            self._ask_trusted_leaders_only()
            self._wait_for_the_group_assembled_at_the_deadline()
        return await super()._step(**kwargs)

    def _wait_for_the_group_assembled_at_the_deadline(self) -> None:
        """A peer leads the group of those who came after it; it declares itself until its search's deadline at
        most, and assembles its followers' group when that declaration expires: at the deadline itself, the very
        moment hivemind stops waiting for a group. Its own wait expired first (the earlier timer), so a member that
        came more than one matchmaking time later (3.5-5 s into a 6 s search: 1 round in 14 measured) was let in and
        then dropped, the round failed on both. A peer with followers (or accepted into a group) at its deadline
        now waits up to ASSEMBLY_GRACE_S more for that group; one without stops at the deadline, as before."""
        matchmaking = self._matchmaking
        look_for_group = matchmaking.look_for_group

        async def nobody_to_wait_for(graced):
            timeout = graced._step.get_timeout()
            if timeout is None or not math.isfinite(timeout):
                return
            await asyncio.sleep(timeout)
            async with matchmaking.lock_request_join_group:  # (no member is being let in meanwhile)
                group = matchmaking.assembled_group
                if matchmaking.step_control is not graced:  # (this search's own group only)
                    return
                if not (group.done() or matchmaking.current_followers or matchmaking.was_accepted_to_group.is_set()):
                    group.set_result(None)  # what hivemind's wait returns at its deadline: no group

        async def look_past_the_deadline(step):
            graced = _PastTheDeadline(step, ASSEMBLY_GRACE_S)
            deadline = asyncio.create_task(nobody_to_wait_for(graced))
            try:
                return await look_for_group(graced)
            finally:
                deadline.cancel()
        matchmaking.look_for_group = look_past_the_deadline

    def _ask_trusted_leaders_only(self) -> None:
        """hivemind's matchmaking asks the peers declared under the round's group key to lead a group: here
        never a banned one, and in an admission-only run only those whose progress records show them admitted (an
        honest peer never joins such a peer's group; the round would fail at `read_group` when it begins)."""
        keys = self._matchmaking.group_key_manager
        declared = keys.get_averagers

        async def trusted_only(group_key, only_active):
            found = await declared(group_key, only_active)
            return [(peer, expiration) for peer, expiration in found if peer.to_base58() not in self.banned
                    and (self.admitted is None or await self.admitted.admits(self.dht, peer.to_base58()))]
        keys.get_averagers = trusted_only
        self._leaders_filtered = True

    async def _ban(self, peer: str) -> None:
        """Called from the trainer's process (every fragment's averager) once one of them caught `peer` lying."""
        self.banned.add(peer)

    async def _dropped(self, future: MPFuture) -> None:
        """Called from the trainer's process: the peers this process has dropped for flooding it (`inbound`)."""
        future.set_result(sorted(p for p in list(inbound.INBOUND.dropped) if inbound.INBOUND.is_dropped(p)))


RECORDS_REFRESH_S = 0.5  # the state records (hashes) of every fragment are read this often in the background
DROPS_REFRESH_S = 2.0  # the trainer asks its averager processes whom they dropped for flooding this often
RECORDS_MAX_AGE_S = 3.0  # older than this (the reader is behind), `latest_agreed` reads them itself


class SwarmAverager(FragmentAverager):
    """One `CodecAverager` per fragment, all on one DHT; `begin` starts a round in the background."""

    def __init__(self, dht, run_id: str, fragment_sizes: list[int], codec_name: str, *, round_timeout: float,
                 target_group_size: int | None = None, min_matchmaking_time: float = 3.0,
                 uplink_mbit: float | None = None, client_mode: bool = False, search_timeout: float | None = None,
                 aggregation: str = "mean", admission: Admission | None = None, token: str = "",
                 audit: float = 0.0, sync_stride: int = 1):
        """`uplink_mbit`: this peer's uplink as declared (`join --bandwidth`): every member of a group learns it
        (load balancing, deadlines: see `butterfly`), and what this peer sends is paced to just under it
        (`butterfly.UplinkPacer`); None: unknown, unpaced. Only a declared uplink paces: a measured one is what
        the paced sends themselves reached, and would only shrink. `aggregation`: the run's rule for combining
        contributions (`core.aggregation`); every member of a group must have the same. `admission`: the run's
        (None: it admits anyone); `token`: this peer's join token, in its round metadata. `audit`: the run's chance
        that a member audits each other reducer's part (`audit`). `sync_stride`: the run's (`core.round_subset`):
        a round of fragment k averages `round_sizes[k]` of its `fragment_sizes[k]` values."""
        self.run_id, self.codec_name, self.round_timeout = run_id, codec_name, round_timeout
        self.aggregation, self.token, self.audit = aggregation, token, audit
        self.banned: set[str] = set()  # reducers this peer caught returning a wrong mean
        self.incidents: list[dict] = []  # what they did, where: the summary's "incidents"
        self.ban_on_proof = True  # (False: scripts/bench_audit.py, to count catches round after round)
        self.audited_parts = 0  # parts this peer recomputed (audits), and the bytes they took
        self.audit_bytes = 0
        # a group forms about one matchmaking time after its first member came: a peer that finds none by one
        # more matchmaking time (it came late, or nobody came) gives up, not after the whole round timeout.
        # Longer, and a round nobody comes to holds its peer up at the fragment's next round (its deadline);
        # shorter (1.5x was tried), and a loaded machine misses groups that were forming
        self.search_timeout = search_timeout or min(round_timeout, 2 * min_matchmaking_time)
        self.dht = dht
        self.peer_id = str(dht.peer_id)
        self.bytes_sent = 0
        self.bytes_received = 0
        self.declared_rate = (uplink_mbit or 0.0) * 125_000.0  # bytes/s; 0: unknown
        self.meter = LinkMeter()  # this machine's uplink as its transfers show it (started with the averagers)
        self.attack = attacks.armed()  # a malicious peer on purpose (tests of what the others withstand)
        self.round_interval_s = 0.0  # seconds between two rounds of a fragment at this peer's pace; 0: unknown
        self.codec_rounds: Counter = Counter()  # rounds averaged per codec
        self.refused: Counter = Counter()  # peer -> rounds in which this peer, reducing, left its contribution out
        self.lookup_s = 0.0  # time the training thread spent reading the swarm's state records (`latest_agreed`)
        self._fetching = threading.Lock()  # held by the one transfer of a state under way (`fetch`)
        self._newest_fetch: dict[int, int] = {}  # fragment -> the newest round whose state `fetch` was asked for
        self._records: dict[int, tuple[float, dict]] = {}  # fragment -> (when read, every peer's state record)
        self._records_lock = threading.Lock()
        self._refresher: threading.Thread | None = None
        self._closing = threading.Event()
        self.fragment_sizes = list(fragment_sizes)
        self.round_sizes = [subset_size(n, sync_stride) for n in fragment_sizes]
        # peers known to be training (from their progress records); None: unknown, trust every record.
        # A dead peer's state-hash record outlives it: it must not count as the swarm's state, nor as a donor.
        self.live_peers: set[str] | None = None
        self._flooders: set[str] = set()  # (`flooders`)
        self._drop_queries: list[MPFuture] = []
        self._drops_asked = -math.inf
        # live peers in client mode (others cannot connect to them): their hashes count, they serve no state
        self.unreachable_peers: set[str] = set()
        if codec_name != AUTO_CODEC:  # (loaded here, the averagers' processes start with it)
            get_codec(codec_name).prepare()
        previous = signal.getsignal(signal.SIGINT)
        self.averagers = [
            CodecAverager(self.round_sizes[k], codec_name, state_numel=numel, dht=dht, prefix=f"{run_id}_f{k}",
                          start=True,
                          target_group_size=target_group_size, min_group_size=2,
                          min_matchmaking_time=min_matchmaking_time,
                          request_timeout=min_matchmaking_time / 2,
                          # no bound on the whole all-reduce: a slow link may need long for a large fragment;
                          # the butterfly's per-chunk deadlines (from the members' rates) notice a stalled member
                          allreduce_timeout=None, next_chunk_timeout=round_timeout,
                          client_mode=client_mode, declare_state_period=3600, paced_uplink=self.declared_rate,
                          admission=admission)
            for k, numel in enumerate(fragment_sizes)]
        signal.signal(signal.SIGINT, previous)  # hivemind makes the creating process ignore Ctrl-C
        self.meter.start()

    @property
    def rate(self) -> float:
        """This peer's uplink in bytes/s as every member of its groups learns it: the peak its transfers reached
        (`LinkMeter`) once measured, else as declared; 0: unknown."""
        return self.meter.up or self.declared_rate

    def begin(self, key: RoundKey, outer_grad: torch.Tensor, weight: float) -> PendingAverage:
        if key.run_id != self.run_id:
            raise AveragingFailed(f"{key}: this averager serves run {self.run_id}")
        av = self.averagers[key.fragment]
        if self.attack is not None:
            outer_grad, weight = self.attack.poison(outer_grad, weight)
        with av.get_tensors() as tensors:
            tensors[0].copy_(outer_grad.reshape(-1))
        av.set_group_bits(format(key.round % (1 << 16), "016b"))
        meta = {"run": key.run_id, "fragment": key.fragment, "round": key.round, "codec": self.codec_name,
                "numel": int(outer_grad.numel()), "weight": float(weight), "rate": self.rate,
                "interval": self.round_interval_s, "aggregation": self.aggregation, "token": self.token,
                "audit": self.audit}
        control = av.step(gather=meta, weight=float(weight), wait=False, timeout=self.search_timeout,
                          allow_retries=False)
        return _SwarmPending(self, av, key, control, time.time())

    def applied(self, key: RoundKey, anchor: torch.Tensor, momentum: torch.Tensor, digest: str) -> None:
        meta = {"run": key.run_id, "fragment": key.fragment, "round": key.round, "sha256": digest}
        self.averagers[key.fragment].served = (meta, [anchor.clone(), momentum.clone()])
        publish_hash(self.dht, self.run_id, self.peer_id, key, digest)

    def recover(self, key: RoundKey, digest: str | None = None) -> AgreedState | None:
        """The state of `key` (hashing to `digest`, else the most common), downloaded from a peer that holds it
        and checked against its hash."""
        # the records may still be propagating
        donors = self._wait_for_donors(key, digest, min(3.0, self.round_timeout / 2))
        return None if donors is None else self._download(key, *donors)

    def _wait_for_donors(self, key: RoundKey, digest: str | None, wait: float) -> tuple[str, list[str]] | None:
        deadline = time.monotonic() + wait
        while not (donors := self._donors(key, digest)):
            if time.monotonic() > deadline:
                return None
            time.sleep(0.5)
        return donors

    def _download(self, key: RoundKey, digest: str, peers: list[str]) -> AgreedState | None:
        # donors in a fixed order, each fragment starting at another one: a joiner spreads its download
        peers = sorted(peers)
        peers = peers[key.fragment % len(peers):] + peers[:key.fragment % len(peers)]
        av = self.averagers[key.fragment]
        for peer in peers:
            try:
                future = MPFuture()
                # a donor that stops sending (stalled, gone) is noticed by the gap between two 64 KB messages
                av._outer_pipe.send(("_download_from", [], dict(peer=peer, timeout=DEADLINE_FLOOR_S,
                                                                  future=future)))
                metadata, tensors = future.result(timeout=self.round_timeout * 2)
                state = decode_state(av, metadata, tensors, key, digest)
                log.warning("recovered %s from %s", key, peer)
                return state
            except Exception as e:  # try the next donor
                log.warning("could not recover %s from %s: %r", key, peer, e)
        return None

    def others_hold(self, fragment: int, round_: int, digest: str | None = None) -> bool:
        """Every other live peer has published that it holds `round_` of `fragment` or later (with `digest`:
        exactly that round and state). False while who is live is unknown."""
        if self.live_peers is None:
            return False
        records = hash_records(self.dht, self.run_id, fragment, self.peer_id, self.live_peers)
        if set(records) != self.live_peers:
            return False
        if digest is None:
            return all(r >= round_ for r, _ in records.values())
        return all(record == (round_, digest) for record in records.values())

    def fetch(self, key: RoundKey, digest: str | None = None) -> Future:
        """`recover` in a thread of its own: the training thread goes on meanwhile. It waits for donors up to about
        a round (the state of a round still under way), then transfers, one transfer at a time (they share this
        peer's downlink). The fragment's averager is not used for rounds until it is done (the core sits that
        fragment's rounds out). A request superseded by a newer one of the same fragment before its transfer
        begins is dropped (None)."""
        future: Future = Future()
        self._newest_fetch[key.fragment] = max(key.round, self._newest_fetch.get(key.fragment, -1))
        # the state of a round still under way (one this peer sits out) is waited for up to about a round
        wait = max(3.0, min(self.round_timeout / 2, self.round_interval_s))

        def superseded() -> bool:
            return self._newest_fetch[key.fragment] > key.round

        def run() -> None:
            try:
                donors = self._wait_for_donors(key, digest, wait)  # (no lock: others download meanwhile)
                if donors is None or superseded():
                    future.set_result(None)
                    return
                with self._fetching:
                    future.set_result(None if superseded() else self._download(key, *donors))
            except BaseException as e:
                future.set_exception(e if isinstance(e, Exception) else AveragingFailed(repr(e)))

        threading.Thread(target=run, name=f"fetch {key}", daemon=True).start()
        return future

    def latest_agreed(self, fragment: int, upto: int) -> RoundReport | None:
        """From the records as a background thread reads them (RECORDS_REFRESH_S): the training thread does not
        wait for DHT lookups (round trips over a WAN) at every round start."""
        began = time.monotonic()
        found = others_records(self._cached_records(fragment), self.peer_id, self.live_peers)
        self.lookup_s += time.monotonic() - began
        records = [(r, d) for r, d in found.values() if r <= upto]
        if not records:
            return None
        latest = max(r for r, _ in records)
        return RoundReport(latest, dict(Counter(d for r, d in records if r == latest)), voters=len(found))

    def _cached_records(self, fragment: int) -> dict[str, tuple[int, str]]:
        """Every peer's (round, state hash) of `fragment` as read at most RECORDS_MAX_AGE_S and a quarter of the
        time between two rounds ago (else read now); starts the thread that keeps them fresh."""
        if not self._caching():
            return self._read_records(fragment)
        if self._refresher is None:
            self._refresher = threading.Thread(target=self._refresh_records, name="state records", daemon=True)
            self._refresher.start()
        with self._records_lock:
            read_at, records = self._records.get(fragment, (-1e9, {}))
        if time.monotonic() - read_at <= self._max_age():
            return records
        return self._read_records(fragment)

    def _max_age(self) -> float:
        # a record one round old is what a round start looks for: at most a quarter of a round's time stale
        return min(RECORDS_MAX_AGE_S, self.round_interval_s / 4)

    def _caching(self) -> bool:
        """Rounds far enough apart for a copy refreshed every RECORDS_REFRESH_S to be fresh enough (else every
        read is a lookup, and no thread spends CPU on refreshing)."""
        return self._max_age() >= 2 * RECORDS_REFRESH_S

    def _read_records(self, fragment: int) -> dict[str, tuple[int, str]]:
        read_at = time.monotonic()
        records = read_hash_records(self.dht, self.run_id, fragment)
        self._keep_records(fragment, read_at, records)
        return records

    def _keep_records(self, fragment: int, read_at: float, records: dict) -> None:
        with self._records_lock:
            if read_at > self._records.get(fragment, (-1e9, {}))[0]:
                self._records[fragment] = (read_at, records)

    def _refresh_records(self) -> None:
        """Every RECORDS_REFRESH_S: every fragment's records, the lookups side by side (each takes round trips)."""
        while not self._closing.wait(RECORDS_REFRESH_S):
            if not self._caching():
                continue
            read_at = time.monotonic()
            lookups = [self.dht.get(hashes_key(self.run_id, k), latest=True, return_future=True)
                       for k in range(len(self.fragment_sizes))]
            for k, lookup in enumerate(lookups):
                try:
                    self._keep_records(k, read_at, parse_hash_records(lookup.result(timeout=RECORDS_MAX_AGE_S)))
                except Exception as e:  # a failed lookup: the next one, or a direct read, takes over
                    log.debug("reading the state records of fragment %d: %r", k, e)

    def _donors(self, key: RoundKey, digest: str | None) -> tuple[str, list[str]] | None:
        by_hash: dict[str, list[str]] = {}
        records = hash_records(self.dht, self.run_id, key.fragment, self.peer_id, self.live_peers)
        for peer, (round_, d) in records.items():
            if round_ == key.round:
                by_hash.setdefault(d, []).append(peer)
        if digest is None and by_hash:  # the majority, if enough peers hold it (`RoundReport.quorum`)
            digest = RoundReport(key.round, {d: len(p) for d, p in by_hash.items()}, voters=len(records)).agreed()
        donors = [p for p in by_hash.get(digest, []) if p not in self.unreachable_peers]
        return (digest, donors) if donors else None

    def flooders(self) -> set[str]:
        """The peers that some averager process of this peer dropped for flooding it (`inbound`), as last heard:
        the trainer leaves them out of the live peers (no waiting on them, no votes, no donors), as the averagers
        leave them out of groups. Asks again, in the background, at most every DROPS_REFRESH_S."""
        if self._drop_queries and all(f.done() for f in self._drop_queries):
            self._flooders = set().union(*(f.result() for f in self._drop_queries if f.exception() is None))
            self._drop_queries = []
        if not self._drop_queries and time.monotonic() - self._drops_asked >= DROPS_REFRESH_S:
            self._drops_asked = time.monotonic()
            for av in self.averagers:
                future = MPFuture()
                av._outer_pipe.send(("_dropped", [], dict(future=future)))
                self._drop_queries.append(future)
        return self._flooders

    def caught(self, reducer: str, key: RoundKey, what: str) -> None:
        """This peer proved that `reducer` lied in round `key`: an incident, and a ban in every fragment."""
        self.incidents.append({"peer": reducer, "fragment": key.fragment, "round": key.round, "what": what})
        if self.ban_on_proof and reducer not in self.banned:
            self.banned.add(reducer)
            log.warning("banning peer %s from this peer's groups and state for the run: %s", reducer, what)
            for av in self.averagers:
                av._outer_pipe.send(("_ban", [], dict(peer=reducer)))

    def shutdown(self) -> None:
        self._closing.set()
        self.meter.stop()
        for av in self.averagers:
            try:
                av.shutdown()
            except Exception as e:  # shutting down must not raise over a dead averager
                log.debug("averager shutdown: %s", e)


class _SwarmPending(PendingAverage):
    def __init__(self, owner: SwarmAverager, av: CodecAverager, key: RoundKey, control, started: float):
        self.owner, self.av, self.key, self.control, self.started = owner, av, key, control, started

    def _safety_net(self) -> float:
        """How long to wait for the averager process at most: the round's own deadlines come first; this only
        catches a process that stopped answering. Enough for the round's values both ways at FLOOR_RATE, 4 times."""
        codec = "fp16" if self.owner.codec_name == AUTO_CODEC else self.owner.codec_name  # auto: at most fp16
        numel = self.owner.round_sizes[self.key.fragment]
        wire = max(get_codec(codec).wire_size(numel), get_codec(codec).mean_codec.wire_size(numel))
        return self.owner.search_timeout + self.owner.round_timeout + 8 * wire / FLOOR_RATE + 5

    def done(self) -> bool:
        return self.control.done()

    def result(self) -> FragmentAverage:
        try:
            gathered = self.control.result(timeout=self._safety_net())
        except ReducerCaught as e:
            self.owner.caught(e.reducer, self.key, e.message)
            raise AveragingFailed(f"{self.key}: {e.message}") from None
        except Exception as e:
            raise AveragingFailed(f"{self.key}: {type(e).__name__}: {e}") from None
        stats = gathered
        if not (isinstance(stats, dict) and {"peers", "weight", "sent", "received"} <= set(stats)):
            raise AveragingFailed(f"{self.key}: the averager returned no round statistics")
        self.owner.bytes_sent += stats["sent"]
        self.owner.bytes_received += stats["received"]
        self.owner.codec_rounds[stats.get("codec", self.owner.codec_name)] += 1
        for peer in stats.get("refused", {}):
            self.owner.refused[peer] += 1
        self.owner.audited_parts += stats.get("audited", 0)
        self.owner.audit_bytes += stats.get("audit_bytes", 0)
        with self.av.get_tensors() as tensors:
            mean = tensors[0].clone()
        members = stats.get("members", ())
        return FragmentAverage(mean, int(stats["peers"]), float(stats["weight"]),
                               tuple(str(m) for m in members) if isinstance(members, (list, tuple)) else ())
