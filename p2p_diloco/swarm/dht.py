"""The DHT: starting a node that dies with its parent, and the run's records in it.

Keys are namespaced by run id: `{run}_config` holds the host's `RunConfig`;
`{run}_progress` holds one `PeerProgress` per peer (subkey = peer id, the record
signed by that peer: `signed_records`). Values are msgpack bytes, validated on
read; a malformed record is logged and ignored.

Bootstrap: a node joins through `initial_peers`, multiaddrs ending in the
peer id of a live peer of the run. Their syntax can be checked before anything
starts (`check_initial_peers`), whether they accept a TCP connection too
(`probe_initial_peers`); a node that still cannot join raises `BootstrapError`
(the message says which address, what failed and what to check), and a daemon
that does not start for another reason raises `DHTStartError`. Either way the
node's process and its daemon have exited by themselves.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time

import hivemind
import multihash
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.utils import get_dht_time
from hivemind.utils.multiaddr import Multiaddr

from ..node.admission import AdmissionError, config_subkey, open_run_config
from ..node.records import PeerProgress, RecordError, RunConfig, check_run_id
from . import inbound, reachability
from .addresses import likeliest_first
from .lifetime import die_with_parent
from .signed_records import SignedRecords, protected_keys

log = logging.getLogger(__name__)

CONFIG_TTL = 120.0
PROGRESS_TTL = 60.0
PROBE_TIMEOUT_S = 4.0  # a bootstrap peer that does not accept a TCP connection in this time counts as unreachable


class BootstrapError(ValueError):
    """This node cannot join the swarm through its initial peers; the message names them and what to check."""


class DHTStartError(RuntimeError):
    """The DHT node's libp2p daemon did not start for a reason other than its initial peers."""


def check_initial_peers(maddrs: list[str], option: str = "--initial-peers") -> list[str]:
    """Each of `maddrs` must be a multiaddr with the peer id of the peer to join through (`/p2p/<id>`, as the
    host prints it); raises BootstrapError naming the first one that is not."""
    example = "/ip4/203.0.113.5/tcp/31337/p2p/QmXyZ... (copy it whole from what the host printed)"
    for text in maddrs:
        try:
            m = Multiaddr(text)
        except Exception as e:
            raise BootstrapError(f"{option} {text!r} is not a multiaddr ({e}); expected e.g. {example}") from None
        if "p2p" not in m:
            raise BootstrapError(f"{option} {text!r} has no /p2p/<peer id> at its end; expected e.g. {example}")
        try:
            PeerID.from_base58(m["p2p"])
        except Exception:
            raise BootstrapError(f"{option} {text!r}: {m['p2p']!r} is not a peer id; expected e.g. {example}") \
                from None
    return maddrs


def is_peer_id(text: str) -> bool:
    """Whether `text` is a libp2p peer id (base58 of a multihash of a public key, as `identity_peer_id` prints)."""
    try:
        multihash.decode(PeerID.from_base58(text).to_bytes())
    except Exception:
        return False
    return True


def create_identity(path: str) -> None:
    """Write a new libp2p key file (hivemind's format) at `path`."""
    P2P.generate_identity(path)


def identity_peer_id(path: str) -> PeerID:
    """The peer id of the key file at `path` (`host --identity`); raises OSError, or another error for a file
    that is not a libp2p private key."""
    with open(path, "rb") as f:
        return PeerID.from_identity(f.read())


def _tcp_target(maddr: str) -> tuple[str, int] | None:
    """(host, port) to open a TCP connection to, or None for an address that is not plain TCP (a relay, QUIC)."""
    try:
        m = Multiaddr(maddr)
        names = [p.name for p in m.protocols()]
        if "p2p-circuit" in names or "tcp" not in names:
            return None
        host = next(m[p] for p in ("ip4", "ip6", "dns", "dns4", "dns6") if p in names)
        return host, int(m["tcp"])
    except Exception:
        return None


async def _connect_problem(host: str, port: int, timeout: float) -> str | None:
    """None if `host:port` accepts a TCP connection within `timeout`, else what happened, in words."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except asyncio.TimeoutError:
        return f"no answer from {host}:{port} within {timeout:.0f} s"
    except ConnectionRefusedError:
        return f"{host}:{port} refused the connection (nothing listens on that port there)"
    except OSError as e:  # name not found, network unreachable, ...
        return f"cannot connect to {host}:{port} ({e.strerror or e})"
    writer.close()
    return None


def probe_initial_peers(maddrs: list[str], timeout: float = PROBE_TIMEOUT_S) -> list[str] | None:
    """Why none of `maddrs` can be reached, one reason per address; None when one of them accepts a TCP
    connection, or when one is not a plain TCP address (then only the daemon can tell)."""
    targets = [_tcp_target(m) for m in maddrs]
    if not maddrs or any(t is None for t in targets):
        return None

    async def probe_all() -> list[str | None]:
        return await asyncio.gather(*(_connect_problem(host, port, timeout) for host, port in targets))

    problems = asyncio.run(probe_all())
    if any(p is None for p in problems):
        return None
    return [f"{m}: {p}" for m, p in zip(maddrs, problems)]


def bootstrap_unreachable(maddrs: list[str], problems: list[str]) -> BootstrapError:
    """The error for `maddrs` none of which can be reached, with `probe_initial_peers`' reasons."""
    ports = ", ".join(sorted({str(t[1]) for t in map(_tcp_target, maddrs) if t}, key=int)) or "-"
    if len(maddrs) == 1:
        which, check = "the bootstrap peer", f"the address is the one the host printed, that the host is up, " \
            f"and that its TCP port {ports} is open"
    else:
        which, check = f"any of the {len(maddrs)} bootstrap peers", "the addresses are the ones the hosts " \
            f"printed, that a host is up, and that its TCP port ({ports}) is open"
    return BootstrapError(
        f"cannot reach {which} in --initial-peers: {'; '.join(problems)}. Check that {check} to this machine "
        "(firewall, port forwarding); --client-mode does not help: it only stops others from connecting to this "
        "peer")


def _start_failure(error: P2PDaemonError, initial_peers: list[str], identity_path: str | None) -> Exception:
    """A project exception, with what to check, for the libp2p daemon's `error`."""
    reason = reachability.daemon_reason(error)
    if initial_peers and "bootstrap" in reason:
        problems = probe_initial_peers(initial_peers)
        if problems:
            return bootstrap_unreachable(initial_peers, problems)
        return BootstrapError(
            f"no peer in --initial-peers answered as the peer id in its address ({', '.join(initial_peers)}), "
            "though its TCP port accepts connections: check that the address is the one the host printed since it "
            "last started (a host started without --identity gets a new peer id each time) and that it is a "
            "p2p-diloco host or peer")
    if initial_peers and "multiaddr" in reason:
        return BootstrapError(f"--initial-peers {', '.join(initial_peers)}: {reason}")
    if identity_path and "already taken" in reason:
        return BootstrapError(f"--identity {identity_path}: another peer of the swarm runs with this key (its peer "
                              "id is taken): stop it, or give this one a key file of its own")
    return DHTStartError(f"the DHT node did not start: {reason}")


class _DHT(hivemind.DHT):
    def run(self) -> None:
        die_with_parent()  # no orphaned DHT (and so no orphaned p2pd) when the peer is SIGKILLed
        super().run()


def start_dht(initial_peers: list[str] | None = None, host_maddrs: list[str] | None = None,
              identity_path: str | None = None, client_mode: bool = False,
              announce_maddrs: list[str] | None = None, run_id: str | None = None,
              admission_only: bool = False) -> hivemind.DHT:
    """A DHT node (and its p2pd). `host_maddrs` default to loopback (tests, local swarms); the CLI passes
    every interface (`addresses.listen_and_announce`). A node not in client mode answers dial-backs
    (`reachability`), so that peers can learn whether they can be reached.

    Records stored under a peer id are signed by that peer and checked by every node (`signed_records`): a node
    that publishes them needs its key file, `identity_path` (created by the daemon when missing). With `run_id`,
    the node also refuses plain values stored over that run's peer records (and, `admission_only`, any run
    config not signed by a run key): `signed_records.protected_keys`.

    Raises BootstrapError when it cannot join through `initial_peers`, DHTStartError when its daemon does not
    start for another reason (the daemon's own message is the exception's cause)."""
    # without a key file of the user's, a new identity each start: its file lives only until the DHT process
    # holds the key
    own_keys = tempfile.mkdtemp(prefix="p2p-diloco-identity-") if identity_path is None else None
    inbound.install()  # limits on what other peers make this node read (the DHT's process forks with them)
    key_path = identity_path or os.path.join(own_keys, "identity.key")
    try:
        dht = _DHT(start=True, initial_peers=initial_peers or None,
                   host_maddrs=host_maddrs or ["/ip4/127.0.0.1/tcp/0"], announce_maddrs=announce_maddrs or None,
                   identity_path=key_path, client_mode=client_mode, record_validators=[SignedRecords(key_path, protected_keys(run_id, admission_only))])
        signer = dht.run_coroutine(_load_signing_key)
    except P2PDaemonError as e:
        raise _start_failure(e, list(initial_peers or []), identity_path) from e
    finally:
        if own_keys:
            shutil.rmtree(own_keys, ignore_errors=True)
    if signer != str(dht.peer_id):
        dht.shutdown()
        raise DHTStartError(f"the key that signs this node's records ({signer}) is not its libp2p identity "
                            f"({dht.peer_id})")
    if not client_mode:
        reachability.serve(dht)
    return dht


async def _load_signing_key(dht: hivemind.DHT, node) -> str | None:
    """In the DHT's process: load the key that signs this node's records (`SignedRecords`); its peer id."""
    for validator in dht._record_validator._validators:
        if isinstance(validator, SignedRecords):
            return validator.load()
    return None


def visible_maddrs(dht: hivemind.DHT) -> list[str]:
    """The node's addresses as other peers see them, the likeliest to work from another machine first."""
    return likeliest_first([str(a) for a in dht.get_visible_maddrs()])


def publish_run_config(dht: hivemind.DHT, run: RunConfig, wait: bool = True, signed: bytes | None = None):
    """Store the run config (the host does, and every trainer again, so the run outlives its host). An
    admission-only run's is `signed` by its run key (`admission.sign_run_config`), stored under the key's subkey."""
    expiration = get_dht_time() + CONFIG_TTL
    if run.admission_only:
        if signed is None:
            raise ValueError("an admission-only run's config is published signed by its run key")
        return dht.store(f"{run.run_id}_config", signed, expiration_time=expiration,
                         subkey=config_subkey(bytes.fromhex(run.run_key)), return_future=not wait)
    return dht.store(f"{run.run_id}_config", run.encode(), expiration_time=expiration, return_future=not wait)


def fetch_run_config(dht: hivemind.DHT, run_id: str, timeout: float = 30.0, run_key: bytes | None = None
                     ) -> RunConfig:
    """`fetch_signed_run_config` without the signed record."""
    return fetch_signed_run_config(dht, run_id, timeout, run_key)[0]


def fetch_signed_run_config(dht: hivemind.DHT, run_id: str, timeout: float = 30.0, run_key: bytes | None = None
                            ) -> tuple[RunConfig, bytes | None]:
    """The run's config from the DHT, and its record signed by `run_key` (the key a join token names; None:
    a run without one); waits up to `timeout` for it to appear.

    Raises RecordError for a malformed or other-version config, AdmissionError for an admission-only run without
    `run_key` (or one that has another), TimeoutError if none is found.
    """
    check_run_id(run_id)
    deadline = time.monotonic() + timeout
    while True:
        found = dht.get(f"{run_id}_config", latest=True)
        if found is not None:
            read = _read_run_config(found.value, run_id, run_key)
            if read is not None:
                return read
        if time.monotonic() > deadline:
            if found is not None:  # (an admission-only run, but not under this token's key)
                raise AdmissionError(f"run {run_id!r} has no config signed by the run key your token names: the "
                                     "token is for another host's run of that name, or for another run id")
            raise TimeoutError(f"no config for run {run_id!r} in the DHT after {timeout:.0f}s: "
                               "is a host for this run up, and is --initial-peers right?")
        time.sleep(1.0)


def _read_run_config(value, run_id: str, run_key: bytes | None) -> tuple[RunConfig, bytes | None] | None:
    if not isinstance(value, dict):  # a run without a run key
        if run_key is not None:
            raise AdmissionError(f"run {run_id!r} has no run key (it admits anyone), but your token names one: "
                                 "the token is for another run")
        return RunConfig.decode(value), None
    if run_key is None:
        raise AdmissionError(f"run {run_id!r} admits only peers with a join token from its host: ask the host for "
                             "one (`p2p-diloco admit`) and pass it with --token")
    entry = value.get(config_subkey(run_key))
    if entry is None:
        return None
    run = RunConfig.decode(open_run_config(entry.value, run_key))
    if run.run_id != run_id or run.run_key != run_key.hex():
        raise RecordError(f"the run config signed by the run key is for run {run.run_id!r} with key "
                          f"{run.run_key[:12]}..., not {run_id!r}")
    return run, entry.value


def publish_progress(dht: hivemind.DHT, run_id: str, progress: PeerProgress) -> None:
    dht.store(f"{run_id}_progress", progress.encode(), expiration_time=get_dht_time() + PROGRESS_TTL,
              subkey=progress.peer_id, return_future=True)


def fetch_progress(dht: hivemind.DHT, run_id: str) -> list[PeerProgress]:
    """Every peer's latest progress record; malformed ones are logged and skipped."""
    return decode_progress(dht.get(f"{run_id}_progress", latest=True))


def request_progress(dht: hivemind.DHT, run_id: str):
    """`fetch_progress` without waiting: a future of the raw entry, for `decode_progress`."""
    return dht.get(f"{run_id}_progress", latest=True, return_future=True)


def decode_progress(found) -> list[PeerProgress]:
    if found is None or not isinstance(found.value, dict):
        return []
    peers = []
    for subkey, item in found.value.items():
        try:
            record = PeerProgress.decode(item.value)
            if record.peer_id != subkey:
                raise RecordError(f"peer_progress record: peer id {record.peer_id!r} stored under {subkey!r}")
            peers.append(record)
        except RecordError as e:
            log.warning("ignoring a progress record from %s: %s", subkey, e)
    return sorted(peers, key=lambda p: p.peer_id)
