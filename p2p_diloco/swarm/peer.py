"""A trainer peer: reads the run config from the DHT, trains, averages fragments with the swarm.

The loop reads like the simulator's: an inner step, then the Streaming DiLoCo
schedule, except that the schedule runs on the swarm's global step
(`clock.SwarmClock`, shared by peers of any speed) rather than on this peer's
own step count; the swarm sits behind `SwarmAverager`. A peer that finds the run
under way takes the swarm's global step and state first. Ctrl-C or SIGTERM stops
after the current step: the rounds in flight are finished (or fail within their
timeouts) and the summary is written.

Before it joins the DHT a peer asks its bootstrap peer for a dial-back
(`reachability`): one that nobody can connect to says so and trains in client
mode. `RoundHealth` watches for rounds that keep failing while others train; the
summary's `problem` says when this peer averaged nothing (`join` then exits non-zero).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import torch

from ..core.fragments import split_fragments
from ..core.inner import InnerTrainer
from ..core.streaming import StreamingDiLoCo
from ..node.checkpoint import load_checkpoint, save_checkpoint
from ..node.records import PeerProgress
from ..task.data import BatchStream, Corpus
from ..task.device import pick_device
from ..task.model import build_model, evaluate, lm_loss
from . import reachability
from .averager import SwarmAverager
from .clock import ClockReading, SwarmClock
from .dht import (CONFIG_TTL, decode_progress, fetch_progress, fetch_run_config, publish_progress, publish_run_config,
                  request_progress, start_dht, visible_maddrs)
from .round_health import RoundHealth

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 1.0
TRAINER_NICENESS = 5
START_MARGIN_S = 2.0  # peers that wait for each other start this long after the last one arrived
FINAL_LINGER_S = 3.0  # after a run's last rounds: time to publish, reconcile, and serve
LIVE_WITHIN_S = 10.0  # a peer whose latest progress record is older is not counted as training


@dataclass
class JoinOptions:
    initial_peers: list[str]
    run_id: str = "default"
    steps: int | None = None  # inner steps of this peer; None: until Ctrl-C
    bandwidth: float | None = None
    client_mode: bool = False  # True: never accept connections; False: accept them unless a dial-back fails
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    announce_maddrs: list[str] = field(default_factory=list)
    data: list[str] = field(default_factory=list)
    summary_path: str | None = None
    progress_json: bool = False  # one JSON line per progress update on stdout (for local-swarm)
    final_sync: bool = False  # one last round of every fragment at the last step (with global_steps)
    threads: int | None = None
    config_timeout: float = 30.0
    global_steps: int | None = None  # stop when the swarm clock reaches this step (local-swarm)
    wait_for_peers: int = 1  # start training once this many peers are present (local-swarm)
    step_delay: float = 0.0  # seconds of sleep after every inner step: a deliberately slow peer
    checkpoint_dir: str | None = None  # save here every `checkpoint_every` applied rounds and on exit
    checkpoint_every: int = 10
    resume: str | None = None  # a checkpoint directory to start from


def anchor_hashes(outer: StreamingDiLoCo) -> list[str]:
    return [hashlib.sha256(a.numpy().tobytes()).hexdigest() for a in outer.anchors]


def run_peer(opts: JoinOptions) -> dict:
    stop = {"now": False}

    def request_stop(signum, frame):
        stop["now"] = True

    reach, client_mode = _check_reachable(opts)
    dht = start_dht(opts.initial_peers, opts.host_maddrs, client_mode=client_mode,
                    announce_maddrs=opts.announce_maddrs)
    averager = None
    try:
        run = fetch_run_config(dht, opts.run_id, timeout=opts.config_timeout)
        peer_id = str(dht.peer_id)
        maddrs = visible_maddrs(dht)
        device = pick_device()
        model = build_model(run.model, run.diloco.seed).to(device)
        corpus = Corpus.load(opts.data or None)
        eval_batches = corpus.eval_batches(run.model.seq_len, 16, 32)
        seed = int.from_bytes(hashlib.sha256(peer_id.encode()).digest()[:4], "little")
        stream = BatchStream(corpus.train, run.model.seq_len, run.batch_size, seed=seed)
        trainer = InnerTrainer(model, run.diloco, lm_loss)
        sizes = [f.numel for f in split_fragments(model, run.diloco.fragments)]
        averager = SwarmAverager(dht, run.run_id, sizes, run.diloco.codec, round_timeout=run.round_timeout,
                                 target_group_size=run.target_group_size, bandwidth=opts.bandwidth,
                                 min_matchmaking_time=run.matchmaking_time,
                                 client_mode=client_mode)
        outer = StreamingDiLoCo(model, run.diloco, averager, run_id=run.run_id)
        if opts.threads:
            # only now: an averager process forked after set_num_threads trips torch's "Invalid thread pool"
            # assert the first time one of its threads runs a parallel op
            torch.set_num_threads(opts.threads)
        _yield_cpu_to_network()
        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        tokens_per_step = run.batch_size * run.model.seq_len
        health = RoundHealth(len(sizes), reach, client_mode)
        if opts.progress_json:
            print(json.dumps({"peer_id": peer_id, "maddrs": maddrs, "client_mode": client_mode}), flush=True)
        elif client_mode:
            print(f"peer {peer_id}: in client mode (sends and receives, serves nothing)", file=sys.stderr)
        else:
            print(f"peer {peer_id}: other peers can join the run through any of", file=sys.stderr)
            for a in maddrs:
                print(f"  {a}", file=sys.stderr)

        resumed = None
        if opts.resume:
            resumed = load_checkpoint(opts.resume, run.run_id, run.model, outer, trainer)
            log.warning("resumed from %s: global step %d, fragments at rounds %s", resumed.path,
                        resumed.global_step, resumed.rounds)
        checkpoint_dir = opts.checkpoint_dir or opts.resume

        join_started = time.time()
        clock = SwarmClock(resumed.global_step if resumed else 0.0)
        swarm = _wait_for_swarm(dht, run.run_id, peer_id, opts, stop, averager, health)
        joined = _join(outer, clock, swarm, resumed is not None)
        time_to_join = round(time.time() - join_started, 2)
        if joined["rounds_held"]:
            log.warning("joined a live run at global step %d in %.1fs; fragments at rounds %s",
                        joined["step"], time_to_join, joined["rounds_held"])

        start = last_report = config_published = time.time()
        clock.start(start)
        first_step = g = int(clock.global_step(start))
        if opts.global_steps is not None:
            g = min(g, opts.global_steps)
        step, loss = 0, float("nan")
        pending_readings = None
        longest_hold = 0.0  # the longest time averaging held up training (one call of outer.advance)
        saved_at_rounds = sum(outer.stats.applied)

        def save() -> None:
            now = time.time()
            path = save_checkpoint(checkpoint_dir, run.run_id, run.model, outer, trainer, clock.global_step(now))
            log.info("checkpoint: %s", path)

        def progress(now: float) -> PeerProgress:
            tokens_per_s = step * tokens_per_step / max(now - start, 1e-9)
            return PeerProgress(peer_id, step, list(outer.stats.applied), tokens_per_s, averager.bytes_sent,
                                averager.bytes_received, loss, clock.global_step(now), clock.steps_per_s, now,
                                reachable=not client_mode)

        while not stop["now"] and (opts.steps is None or step < opts.steps) \
                and (opts.global_steps is None or g < opts.global_steps):
            loss = trainer.step(stream.next().to(device), schedule_step=g)
            if opts.step_delay:
                time.sleep(opts.step_delay)
            step += 1
            outer.record_tokens(tokens_per_step)
            now = time.time()
            target = clock.step_done(now)
            if pending_readings is not None and pending_readings.done():
                target = clock.observe(_readings(pending_readings, peer_id, averager, health), now)
                pending_readings = None
            if opts.global_steps is not None:
                target = min(target, opts.global_steps)
            held = time.monotonic()
            # a round boundary passed more than a matchmaking time ago has its group already: sit it out
            rate = clock.swarm_rate or clock.steps_per_s  # global steps per second
            outer.advance(g, target, max_lag=math.ceil(run.matchmaking_time * rate))
            longest_hold = max(longest_hold, time.monotonic() - held)
            g = max(g, target)
            if checkpoint_dir and sum(outer.stats.applied) - saved_at_rounds >= opts.checkpoint_every:
                save()
                saved_at_rounds = sum(outer.stats.applied)
            if now - last_report >= PROGRESS_EVERY_S:
                last_report = now
                record = progress(now)
                publish_progress(dht, run.run_id, record)
                if now - config_published >= CONFIG_TTL / 4:  # the run outlives its host
                    publish_run_config(dht, run, wait=False)
                    config_published = now
                if pending_readings is None:
                    pending_readings = request_progress(dht, run.run_id)
                problem = health.check(outer.stats)
                if problem and opts.progress_json:
                    print(json.dumps({"peer_id": peer_id, "problem": problem}), flush=True)
                _report(opts, record, outer.stats.failed)
        if stop["now"]:  # a clean leave: the others' clocks stop counting on this peer at once
            publish_progress(dht, run.run_id, dataclasses.replace(progress(time.time()), training=False))
        outer.finish_in_flight()
        if opts.final_sync and not stop["now"]:
            # no next round to protect: a peer that reaches the end before the others waits for them
            averager.search_timeout = run.round_timeout
            outer.start_final_rounds(g)
            outer.finish_in_flight()
            time.sleep(FINAL_LINGER_S)  # the others publish their last hashes...
            outer.reconcile()  # ...a peer whose last round failed takes theirs...
            time.sleep(FINAL_LINGER_S)  # ...while everyone still serves its state
        if checkpoint_dir:
            save()
        eval_model = build_model(run.model, run.diloco.seed)
        outer.load_anchors_into(eval_model)
        summary = {
            "peer_id": peer_id,
            "maddrs": maddrs,
            "inner_steps": step,
            "global_step": g,
            "joined_at_step": first_step,
            "resumed_from_step": resumed.global_step if resumed else None,
            "time_to_join_s": time_to_join,
            "rounds_held_at_join": joined["rounds_held"],
            "rounds": list(outer.stats.applied),
            "rounds_failed": list(outer.stats.failed),
            "rounds_recovered": list(outer.stats.recovered),
            "rounds_resynced": list(outer.stats.resynced),
            "rounds_averaged": outer.stats.averaged,
            "client_mode": client_mode,
            "reachability": reach.describe() if reach else "not checked (client mode chosen)",
            "problem": health.verdict(outer.stats),
            "longest_hold_s": round(longest_hold, 3),
            "eval_loss": evaluate(eval_model, eval_batches),
            "train_loss": loss,
            "wire_bytes_sent": averager.bytes_sent,
            "wire_bytes_received": averager.bytes_received,
            "anchor_sha256": anchor_hashes(outer),
            "wall_s": round(time.time() - start, 2),
        }
        if opts.summary_path:
            tmp = opts.summary_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(summary, f, indent=1)
            os.replace(tmp, opts.summary_path)
        return summary
    finally:
        if averager is not None:
            averager.shutdown()
        dht.shutdown()


def _yield_cpu_to_network() -> None:
    """Lower this process's CPU priority, not that of its DHT, averagers and p2pd (started before, so unaffected).

    Training keeps going while rounds are in flight; on a machine whose cores are
    all busy training, the processes that move the bytes must not wait behind it.
    """
    try:
        os.nice(TRAINER_NICENESS)
    except OSError as e:  # not permitted or not supported: run at the same priority
        log.debug("could not lower the trainer's priority: %s", e)


def _live(records: list[PeerProgress], peer_id: str, averager: SwarmAverager, health: RoundHealth
          ) -> list[ClockReading]:
    """The clock readings of the other peers training now; tells the averager and the health watch who they are."""
    now = time.time()
    live = [p for p in records if p.training and p.peer_id != peer_id and now - p.time <= LIVE_WITHIN_S]
    averager.live_peers = {p.peer_id for p in live}
    averager.unreachable_peers = {p.peer_id for p in live if not p.reachable}
    health.observe_swarm(len(live), sum(p.reachable for p in live), max((sum(p.rounds) for p in live), default=0))
    return [ClockReading(p.global_step, p.steps_per_s, p.time) for p in live]


def _readings(future, peer_id: str, averager: SwarmAverager, health: RoundHealth) -> list[ClockReading]:
    """`_live` from a finished `request_progress`."""
    try:
        records = decode_progress(future.result())
    except Exception as e:  # a failed DHT lookup only delays alignment
        log.warning("could not read the swarm's progress: %r", e)
        return []
    return _live(records, peer_id, averager, health)


def _check_reachable(opts: JoinOptions) -> tuple[reachability.Reachability | None, bool]:
    """(what a dial-back found, whether this peer runs in client mode). A peer nobody can connect to says so,
    with what would fix it, and goes on in client mode."""
    if opts.client_mode:
        return None, True
    reach = reachability.check(opts.initial_peers, opts.host_maddrs, opts.announce_maddrs)
    if reach.reachable is False:
        print(f"this peer cannot be reached from other machines: {reach.describe()}. It trains on in client mode "
              "(sends its parts and receives the means; reduces no part, serves no state). To accept connections: "
              "open its TCP port in the firewall (pick it with --port), or forward a port to it and pass "
              "--announce-maddrs /ip4/PUBLIC_IP/tcp/PORT", file=sys.stderr, flush=True)
        return reach, True
    if reach.reachable is None:
        log.warning("%s; assuming it can be reached", reach.describe())
    return reach, False


def _wait_for_swarm(dht, run_id: str, peer_id: str, opts: JoinOptions, stop: dict, averager: SwarmAverager,
                    health: RoundHealth) -> list[ClockReading]:
    """Announce this peer; wait until `opts.wait_for_peers` peers are present or the run is under way.

    Peers that wait for each other start together: at START_MARGIN_S after the
    last one announced itself (every peer reads the same announcements).
    Returns the clock readings of the peers already training (empty: this peer starts the run).
    """
    announced = time.time()
    deadline = time.monotonic() + opts.config_timeout
    while True:
        publish_progress(dht, run_id, PeerProgress(peer_id, 0, time=announced, training=False))
        records = fetch_progress(dht, run_id)
        training = _live(records, peer_id, averager, health)
        waiting = {p.peer_id: p.time for p in records if not p.training} | {peer_id: announced}
        if training or stop["now"] or opts.wait_for_peers <= 1:
            return training
        if len(waiting) >= opts.wait_for_peers:
            time.sleep(max(0.0, max(waiting.values()) + START_MARGIN_S - time.time()))
            return []
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(waiting)} of {opts.wait_for_peers} peers showed up in "
                               f"{opts.config_timeout:.0f}s")
        time.sleep(0.5)


def _join(outer: StreamingDiLoCo, clock: SwarmClock, swarm: list[ClockReading], resumed: bool) -> dict:
    """Take the swarm's global step and state (anchors, momenta) when the run is under way.

    A peer resumed from a checkpoint keeps its own state: at each fragment's next
    round it adopts the swarm's instead if the swarm holds a newer one (catch-up).
    """
    if not swarm:
        return {"rounds_held": [], "step": int(clock.global_step(time.time()))}
    step = clock.observe(swarm, time.time(), joining=True)
    held = list(outer.base_round) if resumed else outer.adopt_swarm_state(step)
    return {"rounds_held": held, "step": step}


def _report(opts: JoinOptions, p: PeerProgress, failed: list[int]) -> None:
    if opts.progress_json:
        print(json.dumps({"peer_id": p.peer_id, "step": p.step, "global_step": int(p.global_step),
                          "rounds": p.rounds, "failed": sum(failed), "loss": p.loss, "tokens_per_s": p.tokens_per_s,
                          "bytes_sent": p.bytes_sent}), flush=True)
    else:
        rounds = "/".join(map(str, p.rounds))
        print(f"step {p.step:6d}  global {int(p.global_step):6d}  rounds {rounds} (failed {sum(failed)})  "
              f"loss {p.loss:.4f}  "
              f"{p.tokens_per_s:8.0f} tok/s  sent {p.bytes_sent / 1e6:8.2f} MB", file=sys.stderr, flush=True)
