"""The host: a bootstrap DHT node that publishes the run config and stays up until stopped."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

from ..node.records import RunConfig
from ..node.seat_ledger import ledger_path
from . import monitor, seats
from .addresses import port_of, rank_of
from .dht import CONFIG_TTL, publish_run_config, start_dht, visible_maddrs


def run_host(run: RunConfig, initial_peers: list[str] | None, host_maddrs: list[str] | None,
             announce_maddrs: list[str] | None, identity_path: str | None, maddrs_file: str | None = None,
             signed: bytes | None = None, run_key_path: str | None = None,
             dashboard: tuple[str, int] | None = None, eval_every: float = 0.0, eval_data=None) -> None:
    """Serve until SIGINT/SIGTERM; re-publishes the config well before it expires. `signed`: the config signed
    by the run key (`node.admission`: an admission-only run), whose file is `run_key_path`. `dashboard`: (address,
    port) to serve the run's live dashboard at (`swarm.monitor`), evaluating the agreed parameters every `eval_every`
    s on what `eval_data` gives (`agreed_eval.held_out_batches`)."""
    stop = threading.Event()
    dht = start_dht(initial_peers, host_maddrs, identity_path=identity_path, announce_maddrs=announce_maddrs,
                    run_id=run.run_id, admission_only=run.admission_only)
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    watching = None
    try:
        if dashboard is not None:
            watching = monitor.watch(dht, run.run_id, dashboard[1], dashboard[0], run=run, eval_every=eval_every,
                                     eval_data=eval_data)
            print(f"dashboard: http://{dashboard[0]}:{watching[1].port}/", flush=True)
        if run.admission_only and run_key_path:
            seats.serve(dht, run_key_path, run.run_id, ledger_path(run_key_path))
        maddrs = visible_maddrs(dht)
        if not publish_run_config(dht, run, signed=signed):
            print("warning: the DHT did not accept the run config yet; retrying", file=sys.stderr)
        if maddrs_file:
            tmp = maddrs_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"maddrs": maddrs, "peer_id": str(dht.peer_id)}, f)
            os.replace(tmp, maddrs_file)
        print(f"hosting run {run.run_id!r} as {dht.peer_id}, reachable at (likeliest from elsewhere first)",
              flush=True)
        for a in maddrs:
            print(f"  {a}", flush=True)
        if all(rank_of(a) >= 3 for a in maddrs):
            print("only this machine can join (this host listens on loopback only):", flush=True)
        else:
            ports = sorted({p for a in maddrs if (p := port_of(a))})
            print(f"peers on other machines need TCP port {', '.join(map(str, ports))} of this host open; "
                  "join it from another machine with:", flush=True)
        if run.admission_only:
            print(f"  p2p-diloco join --initial-peers {maddrs[0]} --run-id {run.run_id} --token TOKEN", flush=True)
            print(f"the run admits only peers with a token: issue one with\n  p2p-diloco admit --run-key "
                  f"{run_key_path} --run-id {run.run_id} [--peer PEER_ID | --seats N]\n(a token with --seats is "
                  f"redeemed here for each trainer's own; seats taken are kept in {ledger_path(run_key_path)})",
                  flush=True)
        else:
            print(f"  p2p-diloco join --initial-peers {maddrs[0]} --run-id {run.run_id}", flush=True)
            print("the run admits anyone who reaches this DHT (no --run-key): fine on a private network; host a "
                  "public run with --run-key", flush=True)
        while not stop.wait(CONFIG_TTL / 4):
            publish_run_config(dht, run, signed=signed)
    finally:
        if watching is not None:
            watching[1].close()
            watching[0].stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
        dht.shutdown()
