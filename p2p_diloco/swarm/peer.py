"""A trainer peer: reads the run config from the DHT, trains, averages fragments with the swarm.

`run_peer` reads top to bottom: check reachability, start the DHT, read the run
config, then `Peer.start` (averagers, outer loop), `join` (resume, wait for the
swarm, take its step and state), `train` (the step loop), `finish` (the rounds
in flight, the last rounds, a checkpoint) and `summarize`.

The step loop reads like the simulator's: an inner step, then the Streaming DiLoCo
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

import json
import logging
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

from ..core.config import ConfigError
from ..core.fragments import split_fragments
from ..core.inner import InnerTrainer
from ..core.streaming import StreamingDiLoCo
from ..node import attacks
from ..node.admission import Admission, AdmissionError, Token
from ..node.checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint
from ..node.metrics import Metrics
from ..node.records import PeerProgress, RunConfig
from ..task.data import BatchStream, Corpus, data_seed
from ..task.dataset import DatasetStream, TextDataset
from ..task.tokenizer import HFTokenizer, has_tokenizer
from ..task.device import autocast_for, describe_device, memory_used, peak_flops, pick_device, resolve_precision
from ..task.model import build_model, built_with, evaluate, flops_per_token, lm_loss, weights_sha256
from . import reachability, seats
from .averager import CodecAverager, SwarmAverager
from .clock import ClockReading, SwarmClock
from .dht import (CONFIG_TTL, decode_progress, fetch_progress, fetch_signed_run_config, publish_progress,
                  publish_run_config, request_progress, start_dht, visible_maddrs)
from .flooding import Flooder
from .lifetime import peak_memory
from .round_health import RoundHealth

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 1.0
TRAINER_NICENESS = 5
START_MARGIN_S = 2.0  # peers that wait for each other start this long after the last one arrived
JOIN_BACKING_WAIT_S = 5.0  # a joiner waits this long at most for a newest round's second holder to publish
FINAL_LINGER_S = 3.0  # after a run's last rounds, at most: time for the others to publish their last hashes
# then, at most, time to serve this peer's state to those whose last round failed (over a slow link a fragment's
# state takes seconds); both end as soon as every live peer holds this peer's state, and both wait a round timeout
# more while a live peer is still training (behind this one: it may search for its last group that long first)
FINAL_SERVE_S = 15.0
LIVE_WITHIN_S = 10.0  # a peer whose latest progress record is older is not counted as training
HELD_UP_S = LIVE_WITHIN_S / 2  # a peer that averaging held up this long publishes its progress (`heartbeat`)


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
    data_seed: int | None = None  # this peer's data order (None: from its peer id, `task.data.data_seed`)
    checkpoint_dir: str | None = None  # save here every `checkpoint_every` applied rounds and on exit
    checkpoint_every: int = 10
    resume: str | None = None  # a checkpoint directory to start from
    token: str = ""  # this peer's join token (`node.admission`); "": for a run that admits anyone
    run_dir: str | None = None  # metrics-PEER_ID.jsonl goes here (`node.metrics`); None: no metrics file
    tensorboard_dir: str | None = None
    wandb_project: str | None = None
    identity_path: str | None = None  # this peer's key file (keeps its peer id); None: a new identity
    dataset: str | None = None  # a local file/folder or hub name read through HF `datasets` (`task.dataset`)
    text_field: str | None = None  # the dataset's column of text; None: "text" or "content"
    streaming: bool = False  # read a local dataset as a stream too (a hub one always is)
    # how this peer computes a step (its own business: the run's batch and hyperparameters stay the run's)
    device: str | None = None  # "cuda:1", "cpu", ...; None: CUDA when present
    precision: str = "auto"  # `task.device.PRECISIONS`: bf16 autocast on a GPU that supports it, else fp32
    micro_batch: int | None = None  # sequences per forward/backward, accumulated to the run's batch; None: whole
    compile: bool = False  # torch.compile the forward and backward passes
    model_dir: str | None = None  # this peer's copy of the run's model directory (pretrained weights, tokenizer)
    tokenizer_dir: str | None = None  # this peer's copy of the run's tokenizer; None: the model directory's


def run_peer(opts: JoinOptions) -> dict:
    """Join the run, train until its end (or a stop signal), finish the rounds in flight; returns the summary."""
    run_key = Token.parse(opts.token).run_key if opts.token else None
    reach, client_mode = _check_reachable(opts)
    dht = start_dht(opts.initial_peers, opts.host_maddrs, identity_path=opts.identity_path, client_mode=client_mode,
                    announce_maddrs=opts.announce_maddrs, run_id=opts.run_id, admission_only=run_key is not None)
    peer = None
    try:
        run, signed = fetch_signed_run_config(dht, opts.run_id, opts.config_timeout, run_key)
        if run_key is not None and Token.parse(opts.token).seats:
            opts = replace(opts, token=_take_seat(dht, opts))
        _check_admitted(run, opts.token, str(dht.peer_id))
        peer = Peer(dht, run, opts, reach, client_mode, signed)
        peer.start()
        peer.join()
        with peer.heartbeat():  # the others count this peer live while it trains, holds for a round, finishes
            peer.train()
            peer.finish()
        return peer.summarize()
    finally:
        if peer is not None:
            peer.close()
        dht.shutdown()


class Peer:
    """One trainer of a run: its task (model, data, inner optimizer), its outer loop and its swarm.

    After `finish` every round this peer started has been applied, adopted from
    the swarm or counted as failed (the core's guarantees, `core/streaming.py`),
    and a checkpoint (when asked for) holds the state the summary reports. A stop
    signal ends the step loop after the current step; a crash loses only what
    happened since the last checkpoint, and the swarm's newer state wins when the
    peer comes back (catch-up).
    """

    def __init__(self, dht, run: RunConfig, opts: JoinOptions, reach: reachability.Reachability | None,
                 client_mode: bool, signed_config: bytes | None = None):
        """`signed_config`: the run config's record as its run key signed it (an admission-only run)."""
        self.dht, self.run, self.opts, self.signed_config = dht, run, opts, signed_config
        self.admission = Admission(run.run_id, bytes.fromhex(run.run_key)) if run.admission_only else None
        self.reach, self.client_mode = reach, client_mode
        self.peer_id = str(dht.peer_id)
        self.maddrs = visible_maddrs(dht)
        try:
            self.device = pick_device(opts.device)
            self.precision = resolve_precision(opts.precision, self.device)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.device_description = describe_device(self.device)
        weights_dir = opts.model_dir if run.model.weights else None
        self.model = build_model(run.model, run.diloco.seed, weights_dir)
        _check_reproducible(run, weights_sha256(self.model) if run.init_sha256 else "", weights_dir)
        self.model = self.model.to(self.device)
        self.parameters = sum(p.numel() for p in self.model.parameters())
        self.peak_flops = peak_flops(self.device)
        self.data_seed = seed = data_seed(self.peer_id) if opts.data_seed is None else opts.data_seed
        tokenizer = _run_tokenizer(run, opts)
        if opts.dataset:  # HF `datasets`: this peer's own stretch of the rows (`task.dataset`)
            dataset = TextDataset.load(opts.dataset, opts.text_field, opts.streaming or None, tokenizer)
            self.data_description = dataset.describe()
            self.eval_batches = dataset.eval_batches(run.model.seq_len, 16, 32)
            self.stream = dataset.stream(run.model.seq_len, run.batch_size, run.diloco.seed, seed)
        else:
            corpus = Corpus.load(opts.data or None)
            self.data_description = corpus.description
            self.eval_batches = corpus.eval_batches(run.model.seq_len, 16, 32)
            self.stream = BatchStream(corpus.train, run.model.seq_len, run.batch_size, seed=seed)
        forward = torch.compile(self.model) if opts.compile else self.model  # (shares the model's parameters)
        self.trainer = InnerTrainer(self.model, run.diloco, lambda model, tokens: lm_loss(forward, tokens),
                                    micro_batch=opts.micro_batch, autocast=autocast_for(self.precision, self.device))
        self.tokens_per_step = run.batch_size * run.model.seq_len
        self.fragment_sizes = [f.numel for f in split_fragments(self.model, run.diloco.fragments)]
        self.health = RoundHealth(len(self.fragment_sizes), reach, client_mode)
        self.checkpoint_dir = opts.checkpoint_dir or opts.resume
        self.averager: SwarmAverager | None = None
        self.outer: StreamingDiLoCo | None = None
        self.stopping = False  # set by SIGINT / SIGTERM: leave after the current step
        # where the run stands for this peer
        self.clock = SwarmClock()
        self.resumed: CheckpointInfo | None = None
        self.joined: dict = {"rounds_held": [], "step": 0}
        self.time_to_join = 0.0
        self.step, self.loss = 0, float("nan")  # this peer's inner steps and its latest training loss
        self.global_step = self.first_step = 0
        self.trained_at: list[int] = []  # the global step of each inner step since the last metrics line
        self.started = self.last_report = self.config_published = 0.0
        self.published = math.inf  # when this peer's progress record last went out (none before training)
        self.silent_for = HELD_UP_S  # the heartbeat publishes once no record went out for this long
        self.leaving = False  # a clean leave: the records say so (the others stop counting on this peer)
        self.pending_readings = None  # a DHT read of the others' progress, in flight
        self.longest_hold = 0.0  # the longest time averaging held up training (one call of outer.advance)
        self.held_s = 0.0  # all the time averaging held up training
        self.trained_s = 0.0  # from the first inner step to the last
        self.saved_at_rounds = 0
        self.unadmitted: set[str] = set()  # peers whose records were ignored (logged once each)
        self.flooder: Flooder | None = None  # P2P_DILOCO_ATTACK=flood (a test's attacker)
        self.metrics = Metrics(self.peer_id, run.run_id, opts.run_dir, opts.tensorboard_dir, opts.wandb_project)

    # -- joining -------------------------------------------------------------------
    def start(self) -> None:
        """Start the averagers (one process per fragment) and the outer loop; take over the stop signals."""
        run = self.run
        self.averager = SwarmAverager(self.dht, run.run_id, self.fragment_sizes, run.diloco.codec,
                                      round_timeout=run.round_timeout, target_group_size=run.target_group_size,
                                      uplink_mbit=self.opts.bandwidth, min_matchmaking_time=run.matchmaking_time,
                                      client_mode=self.client_mode, aggregation=run.diloco.aggregation,
                                      admission=self.admission, token=self.opts.token, audit=run.diloco.audit,
                                      sync_stride=run.diloco.sync_stride)
        self.outer = StreamingDiLoCo(self.model, run.diloco, self.averager, run_id=run.run_id)
        if self.metrics.path is not None:  # what became of every round, into the metrics file
            self.outer.round_log = []
        if self.opts.threads:
            # only now: an averager process forked after set_num_threads trips torch's "Invalid thread pool"
            # assert the first time one of its threads runs a parallel op
            torch.set_num_threads(self.opts.threads)
        self.device_description = describe_device(self.device)
        _yield_cpu_to_network()
        if attacks.armed() is not None and attacks.armed().kind == "flood":
            self.flooder = Flooder(self.dht, self._flood_targets)
            self.flooder.start()
        signal.signal(signal.SIGINT, self._request_stop)
        signal.signal(signal.SIGTERM, self._request_stop)
        self._say_where()

    def _flood_targets(self) -> dict[str, list[str]]:
        """(P2P_DILOCO_ATTACK=flood) every other training peer's averager handlers."""
        names = [CodecAverager._get_handle_name(f"{self.run.run_id}_f{k}", method)
                 for k in range(len(self.fragment_sizes)) for method in ("rpc_codec_part", "rpc_join_group")]
        try:
            return {p.peer_id: names for p in fetch_progress(self.dht, self.run.run_id)
                    if p.training and p.peer_id != self.peer_id}
        except Exception:
            return {}

    def _request_stop(self, signum, frame) -> None:
        self.stopping = True

    def _say_where(self) -> None:
        if self.opts.progress_json:
            print(json.dumps({"peer_id": self.peer_id, "maddrs": self.maddrs, "client_mode": self.client_mode}),
                  flush=True)
        elif self.client_mode:
            print(f"peer {self.peer_id}: in client mode (sends and receives, serves nothing)", file=sys.stderr)
        else:
            print(f"peer {self.peer_id}: other peers can join the run through any of", file=sys.stderr)
            for a in self.maddrs:
                print(f"  {a}", file=sys.stderr)

    def join(self) -> None:
        """Resume from a checkpoint when asked; wait for the swarm; take its global step and state if under way."""
        if self.opts.resume:
            self.resumed = load_checkpoint(self.opts.resume, self.run.run_id, self.run.model, self.outer,
                                           self.trainer)
            log.warning("resumed from %s: global step %d, fragments at rounds %s", self.resumed.path,
                        self.resumed.global_step, self.resumed.rounds)
            self.clock = SwarmClock(self.resumed.global_step)
            where = self.resumed.data_position
            if isinstance(self.stream, DatasetStream) and where is not None:
                if where.get("dataset") == self.opts.dataset:
                    self.stream.seek(where)
                    log.warning("the dataset goes on from pass %s, row %s of this peer's order", where.get("pass"),
                                where.get("row"))
                else:
                    log.warning("the checkpoint read dataset %r, this peer reads %r: reading starts afresh",
                                where.get("dataset"), self.opts.dataset)
        join_started = time.time()
        swarm = _wait_for_swarm(self)
        self.joined = _join(self.outer, self.clock, swarm, self.resumed is not None)
        self.time_to_join = round(time.time() - join_started, 2)
        if self.joined["rounds_held"]:
            log.warning("joined a live run at global step %d in %.1fs; fragments at rounds %s",
                        self.joined["step"], self.time_to_join, self.joined["rounds_held"])

    # -- the step loop -----------------------------------------------------------------
    def train(self) -> None:
        """Inner steps until the end (--steps, --global-steps, or a stop signal); the outer schedule runs on
        the swarm's global step after each one."""
        self.started = self.last_report = self.config_published = self.published = time.time()
        self.clock.start(self.started)
        self.first_step = self.global_step = int(self.clock.global_step(self.started))
        if self.opts.global_steps is not None:
            self.global_step = min(self.global_step, self.opts.global_steps)
        self.saved_at_rounds = sum(self.outer.stats.applied)
        while not self._at_end():
            if self.outer.round_log is not None:  # (kept for the metrics file)
                self.trained_at.append(self.global_step)
            self.loss = self.trainer.step(self.stream.next().to(self.device), schedule_step=self.global_step)
            if self.opts.step_delay:
                time.sleep(self.opts.step_delay)
            self.step += 1
            self.outer.record_tokens(self.tokens_per_step)
            now = time.time()
            self._advance_schedule(now)
            if self.checkpoint_dir and sum(self.outer.stats.applied) - self.saved_at_rounds >= self.opts.checkpoint_every:
                self._save()
            if now - self.last_report >= PROGRESS_EVERY_S:
                self._report(now)
        self.trained_s = time.time() - self.started

    def _at_end(self) -> bool:
        opts = self.opts
        return self.stopping or (opts.steps is not None and self.step >= opts.steps) \
            or (opts.global_steps is not None and self.global_step >= opts.global_steps)

    def _advance_schedule(self, now: float) -> None:
        """Move the global step (own speed, then the others' readings when a DHT read came back); run the
        rounds due in between."""
        target = self.clock.step_done(now)
        if self.pending_readings is not None and self.pending_readings.done():
            target = self.clock.observe(_readings(self.pending_readings, self),
                                        now)
            self.pending_readings = None
        if self.opts.global_steps is not None:
            target = min(target, self.opts.global_steps)
        held = time.monotonic()
        # a round boundary passed more than a matchmaking time ago has its group already: sit it out
        rate = self.clock.swarm_rate or self.clock.speed(now)  # global steps per second
        if rate > 0:  # what `--codec auto` fits a fragment's all-reduce into
            self.averager.round_interval_s = self.run.diloco.outer_period / rate
        self.clock.hold(now)  # (a round's result late: this peer's global step waits while it is held up)
        self.outer.advance(self.global_step, target, max_lag=math.ceil(self.run.matchmaking_time * rate))
        self.clock.release(time.time())
        self.longest_hold = max(self.longest_hold, time.monotonic() - held)
        self.held_s += time.monotonic() - held
        self.global_step = max(self.global_step, target)

    def _report(self, now: float) -> None:
        """Every PROGRESS_EVERY_S: publish progress (and, now and then, the run config: the run outlives its
        host), ask for the others' progress, check the rounds' health, print a line."""
        self.last_report = now
        record = self._progress(now)
        self.published = now
        publish_progress(self.dht, self.run.run_id, record)
        if now - self.config_published >= CONFIG_TTL / 4:
            publish_run_config(self.dht, self.run, wait=False, signed=self.signed_config)
            self.config_published = now
        if self.pending_readings is None:
            self.pending_readings = request_progress(self.dht, self.run.run_id)
        problem = self.health.check(self.outer.stats)
        if problem and self.opts.progress_json:
            print(json.dumps({"peer_id": self.peer_id, "problem": problem}), flush=True)
        figures = self._figures(now)
        _print_progress(self.opts, record, self.outer.stats.failed, figures)
        self._log_metrics(record, figures=figures)

    def _log_metrics(self, record: PeerProgress, eval_loss: float | None = None, figures: dict | None = None) -> None:
        stats = self.outer.stats
        figures = figures or self._figures(time.time())
        self.metrics.log({"step": record.step, "global_step": self.global_step, "loss": record.loss,
                          "tokens_per_s": record.tokens_per_s, "bytes_sent": record.bytes_sent,
                          "bytes_received": record.bytes_received, "rounds": list(stats.applied),
                          "failed": list(stats.failed), "recovered": list(stats.recovered), "eval_loss": eval_loss,
                          **{k: figures[k] for k in ("mfu", "gpu_memory_mb") if figures[k] is not None},
                          **({"round_records": self._drain_round_log(), "trained_at": self._drain_trained_at(),
                              "data_seed": self.data_seed, "data": self.data_description}
                             if self.outer.round_log is not None else {})})

    def _drain_trained_at(self) -> list[int]:
        steps, self.trained_at = self.trained_at, []
        return steps

    def _drain_round_log(self) -> list[dict]:
        log = self.outer.round_log
        n = len(log)
        records = log[:n]
        del log[:n]
        return records

    def _figures(self, now: float) -> dict:
        """Tokens/s since training started, MFU (on a GPU whose peak is known, else None) and the GPU memory
        torch's allocator has held at most (None on the CPU)."""
        tokens_per_s = self.step * self.tokens_per_step / max(now - self.started, 1e-9) if self.started else 0.0
        mfu = None
        if self.peak_flops:
            mfu = round(tokens_per_s * flops_per_token(self.run.model, self.parameters) / self.peak_flops, 4)
        used = memory_used(self.device)
        return {"tokens_per_s": round(tokens_per_s, 1), "mfu": mfu,
                "gpu_memory_mb": None if used is None else round(used / 2**20, 1)}

    def _progress(self, now: float) -> PeerProgress:
        tokens_per_s = self.step * self.tokens_per_step / max(now - self.started, 1e-9)
        return PeerProgress(self.peer_id, self.step, list(self.outer.stats.applied), tokens_per_s,
                            self.averager.bytes_sent, self.averager.bytes_received, self.loss,
                            self.clock.global_step(now), self.clock.speed(now), now, reachable=not self.client_mode,
                            training=not self.leaving, token=self.opts.token, device=self.device_description,
                            rounds_failed=sum(self.outer.stats.failed),
                            uplink_mbit=round(self.averager.meter.up / 125_000, 2))

    def _save(self) -> None:
        path = save_checkpoint(self.checkpoint_dir, self.run.run_id, self.run.model, self.outer, self.trainer,
                               self.clock.global_step(time.time()), data_position=self._data_position())
        self.saved_at_rounds = sum(self.outer.stats.applied)
        log.info("checkpoint: %s", path)

    def _data_position(self) -> dict | None:
        return self.stream.position() if isinstance(self.stream, DatasetStream) else None

    # -- the end of a run ----------------------------------------------------------------
    def finish(self) -> None:
        """Finish the rounds in flight; at a planned end, one last round of every fragment, then take the
        swarm's state where this peer's last round failed; save."""
        if self.stopping:  # a clean leave: the others' clocks stop counting on this peer at once
            self.leaving = True
            publish_progress(self.dht, self.run.run_id, self._progress(time.time()))
        self.outer.finish_in_flight()
        if self.opts.final_sync and not self.stopping:
            # no next round to protect: a peer that reaches the end before the others waits for them
            self.averager.search_timeout = self.run.round_timeout
            self.silent_for = PROGRESS_EVERY_S  # the step loop no longer publishes
            sat_out = []
            for final_pass in range(self.outer.final_passes):  # (more than one with a sync_stride)
                applied = sum(self.outer.stats.applied)
                sat_out += self.outer.start_final_rounds(self.global_step, trained=self.step > 0,
                                                         final_pass=final_pass)
                self.outer.finish_in_flight()
                if self.step > 0 and sum(self.outer.stats.applied) == applied:
                    break  # nobody to average with: the passes after would each wait a round timeout for nobody
            # the others publish their last rounds (a live peer still training gets there, a round timeout
            # at most after this one: the clock may have brought this peer to the end first; a peer that joined
            # at the end and sits the last rounds out waits for them, a round timeout at most per final pass)...
            self._linger(FINAL_LINGER_S + (self.run.round_timeout * self.outer.final_passes if sat_out else 0.0),
                         same_state=False)
            self.outer.reconcile()  # ...a peer whose last round failed takes theirs...
            if not self.client_mode:  # ...while everyone still serves its state (a client-mode peer serves none)
                self._linger(FINAL_SERVE_S, same_state=True)
        if self.checkpoint_dir:
            self._save()

    @contextmanager
    def heartbeat(self):
        """While the block runs, publish this peer's progress from a thread of its own whenever no record went
        out for `silent_for` s: when averaging holds training up for long (a round's result late, a download, a
        slow DHT on a loaded machine: HELD_UP_S) and at the end of a run (its last rounds, the lingers: every
        PROGRESS_EVERY_S), where the step loop no longer publishes. Without it such a peer looks gone after
        LIVE_WITHIN_S: the others leave it out of the vote, end their run without it and stop serving it their
        state (it then ends apart). (Short holds stay silent, as before, and nothing goes out before the first
        step: records refreshed through every short hold made rounds fail in a loaded swarm; measured, the
        cause not pinned down.)"""
        done = threading.Event()

        def beat() -> None:
            while not done.wait(PROGRESS_EVERY_S / 2):
                now = time.time()
                if now - self.published < self.silent_for:
                    continue
                try:
                    self.published = now
                    publish_progress(self.dht, self.run.run_id, self._progress(now))
                except Exception as e:  # the next beat tries again
                    log.debug("could not publish progress: %r", e)

        beating = threading.Thread(target=beat, name="heartbeat", daemon=True)
        beating.start()
        try:
            yield
        finally:
            done.set()
            beating.join(timeout=5.0)

    def _linger(self, most: float, same_state: bool) -> None:
        """Wait until every other live peer holds each fragment's last round: the last round this peer
        started or sat out, any state of it (`same_state` False: when this peer's last round failed, the
        others' state of it is then there to take), or exactly this peer's round and state (True: nobody will
        download it from here any more). At most `most` s, and a round timeout more while a live peer is still
        behind this one's global step (still training: it will search for its last groups, then download)."""
        began = time.monotonic()
        outer = self.outer
        while True:
            # who is live now (a peer that joined at the very end counts): a fresh read of the progress records
            readings = _readings(request_progress(self.dht, self.run.run_id), self)
            waited = time.monotonic() - began
            behind = any(r.global_step < self.global_step for r in readings)
            if waited >= most + (self.run.round_timeout if behind else 0.0):
                return
            if all(self.averager.others_hold(k, outer.base_round[k], outer.digests[k]) if same_state
                   else self.averager.others_hold(k, max(outer.base_round[k], outer.last_round[k]))
                   for k in range(len(outer.fragments))):
                return
            time.sleep(0.5)

    def summarize(self) -> dict:
        """The run as this peer saw it; written to `opts.summary_path` (atomically) when given."""
        eval_model = build_model(replace(self.run.model, weights=""), self.run.diloco.seed)  # (anchors next)
        self.outer.load_anchors_into(eval_model)
        stats, reach = self.outer.stats, self.reach
        summary = {
            "peer_id": self.peer_id,
            "maddrs": self.maddrs,
            "inner_steps": self.step,
            "global_step": self.global_step,
            "joined_at_step": self.first_step,
            "resumed_from_step": self.resumed.global_step if self.resumed else None,
            "time_to_join_s": self.time_to_join,
            "rounds_held_at_join": self.joined["rounds_held"],
            "rounds": list(stats.applied),
            "rounds_failed": list(stats.failed),
            "rounds_recovered": list(stats.recovered),
            "rounds_resynced": list(stats.resynced),
            "rounds_averaged": stats.averaged,
            "client_mode": self.client_mode,
            "reachability": reach.describe() if reach else "not checked (client mode chosen)",
            "problem": self._problem(),
            "longest_hold_s": round(self.longest_hold, 3),
            "held_s": round(self.held_s, 3),
            "records_lookup_s": round(self.averager.lookup_s, 3),
            "train_s": round(self.trained_s, 3),
            "eval_loss": evaluate(eval_model, self.eval_batches),
            "data": self.data_description,  # what this peer trained on (and evaluated on: its held-out part)
            "train_loss": self.loss,
            "wire_bytes_sent": self.averager.bytes_sent,
            "wire_bytes_received": self.averager.bytes_received,
            # this machine's link as its transfers showed it (0: nothing measured, e.g. every peer on loopback)
            # and as declared (--bandwidth); groups learn the measured uplink once there is one
            "uplink_measured_mbit": round(self.averager.meter.up / 125_000, 2),
            "downlink_measured_mbit": round(self.averager.meter.down / 125_000, 2),
            "uplink_declared_mbit": self.opts.bandwidth,
            "codec_rounds": dict(self.averager.codec_rounds),  # rounds averaged per codec (`--codec auto` varies)
            # incidents: peer -> rounds in which this peer, reducing, refused its contribution as an outlier
            "refused_contributions": dict(self.averager.refused),
            "incidents": list(self.averager.incidents),  # reducers this peer caught lying, and where
            "banned": sorted(self.averager.banned),
            "dropped": sorted(self.averager.flooders()),  # peers dropped for flooding this one (`inbound`)
            "audited_parts": self.averager.audited_parts, "audit_bytes": self.averager.audit_bytes,
            # (fragment, round) states that a single peer published and nobody else held: passed over
            "states_passed_over": sorted(self.outer.unbacked),
            "state_sha256": list(self.outer.digests),  # per fragment: the hash the swarm votes on
            "wall_s": round(time.time() - self.started, 2),
            # the highest resident memory of this peer's processes (trainer, averagers, DHT, p2pd), each's own
            # peak, summed: an upper bound on what it ever held at once
            "peak_memory_mb": round(peak_memory(os.getpid()) / 2**20, 1),
            # how this peer computed its steps, and how fast
            "device": self.device_description, "precision": self.precision, "micro_batch": self.opts.micro_batch,
            "compiled": self.opts.compile, "parameters": self.parameters,
            **self._figures(time.time()),
        }
        if self.flooder is not None:
            summary["flood"] = self.flooder.stop()
        self._log_metrics(self._progress(time.time()), summary["eval_loss"])
        if self.opts.summary_path:
            tmp = self.opts.summary_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(summary, f, indent=1)
            os.replace(tmp, self.opts.summary_path)
        return summary

    def _problem(self) -> str | None:
        """Why this peer was of no use to the run (`join` then exits non-zero), or None."""
        end = self.opts.global_steps
        if end is not None and self.step == 0 and self.first_step >= end:
            return (f"the run had ended when this peer joined (the swarm's clock at global step {self.first_step}, "
                    f"the run ends at {end}): it trained nothing")
        return self.health.verdict(self.outer.stats)

    def close(self) -> None:
        self.metrics.close()
        if self.averager is not None:
            self.averager.shutdown()


def _yield_cpu_to_network() -> None:
    """Lower this process's CPU priority, not that of its DHT, averagers and p2pd (started before, so unaffected).

    Training keeps going while rounds are in flight; on a machine whose cores are
    all busy training, the processes that move the bytes must not wait behind it.
    """
    try:
        os.nice(TRAINER_NICENESS)
    except OSError as e:  # not permitted or not supported: run at the same priority
        log.debug("could not lower the trainer's priority: %s", e)


def _live(records: list[PeerProgress], peer: Peer) -> list[ClockReading]:
    """The clock readings of the other peers training now (in an admission-only run: the admitted ones; never
    one caught lying or dropped for flooding); tells the averager and the health watch who they are."""
    now, peer_id, averager, health = time.time(), peer.peer_id, peer.averager, peer.health
    live = [p for p in _admitted(records, peer) if p.training and p.peer_id != peer_id
            and now - p.time <= LIVE_WITHIN_S and p.peer_id not in averager.banned
            and p.peer_id not in averager.flooders()]
    averager.live_peers = {p.peer_id for p in live}
    averager.unreachable_peers = {p.peer_id for p in live if not p.reachable}
    health.observe_swarm(len(live), sum(p.reachable for p in live), max((sum(p.rounds) for p in live), default=0))
    return [ClockReading(p.global_step, p.steps_per_s, p.time) for p in live]


def _admitted(records: list[PeerProgress], peer: Peer) -> list[PeerProgress]:
    """The records whose token admits their peer (all of them in a run that admits anyone); the others are
    logged once per peer id."""
    if peer.admission is None:
        return records
    admitted = []
    for p in records:
        problem = peer.admission.problem(p.token, p.peer_id)
        if problem is None:
            admitted.append(p)
        elif p.peer_id not in peer.unadmitted:
            peer.unadmitted.add(p.peer_id)
            log.warning("ignoring peer %s: it is not admitted to this run (%s); logged once", p.peer_id, problem)
    return admitted


def _check_reproducible(run: RunConfig, mine: str, weights_dir: str | None) -> None:
    """Refuse a run whose model this peer would start from other weights (sha256 `mine`) than the host (another
    library version initialises differently, another copy of the pretrained weights): its outer gradients would be
    against parameters nobody else has."""
    if run.init_sha256 and mine != run.init_sha256:
        if weights_dir:
            raise ConfigError(f"this peer cannot reproduce run {run.run_id!r}: the weights of --model {weights_dir} "
                              f"(sha256 {mine[:12]}…) are not the host's ({run.init_sha256[:12]}…): copy the "
                              f"run's {run.model.weights!r} directory as it is")
        raise ConfigError(f"this peer cannot reproduce run {run.run_id!r}: its model starts from other weights here "
                          f"(sha256 {mine[:12]}…) than at the host ({run.init_sha256[:12]}…). The host built it with "
                          f"{run.built_with or 'unrecorded versions'}; this peer has {built_with()}: install the "
                          "host's versions")


def _run_tokenizer(run: RunConfig, opts: JoinOptions):
    """The run's tokenizer from this peer's copy (checked against the run's hash of it), or None for bytes;
    ConfigError naming what is missing or different."""
    directory = opts.tokenizer_dir or (opts.model_dir if opts.model_dir and has_tokenizer(opts.model_dir) else None)
    if not run.model.tokenizer:
        if opts.tokenizer_dir:
            raise ConfigError(f"--tokenizer {opts.tokenizer_dir}: run {run.run_id!r} is byte-level (it names no "
                              "tokenizer)")
        return None
    if directory is None:
        raise ConfigError(f"run {run.run_id!r} uses a tokenizer (sha256 {run.model.tokenizer[:12]}…): give this "
                          "peer its copy with --tokenizer DIR (or a --model DIR that holds it)")
    if not opts.dataset:
        raise ConfigError(f"run {run.run_id!r} uses a tokenizer: train on a --dataset (the stdlib sources and "
                          "--data files are read as bytes)")
    tokenizer = HFTokenizer.load(directory)
    if tokenizer.sha256 != run.model.tokenizer:
        raise ConfigError(f"--tokenizer {directory}: it encodes differently from the run's tokenizer (sha256 "
                          f"{tokenizer.sha256[:12]}… here, {run.model.tokenizer[:12]}… in the run)")
    return tokenizer


def _take_seat(dht, opts: JoinOptions) -> str:
    """Redeem the limited open token at the host for one of this peer's own (`swarm.seats`)."""
    mine = seats.redeem(dht, opts.initial_peers, opts.token)
    log.warning("took a seat of the token: this peer's own token (it needs this identity: keep it with --identity "
                "FILE and pass it as --token next time, or redeem the same seat again with that identity): %s", mine)
    if opts.identity_path is None:
        log.warning("no --identity: a restart of this peer is a new identity and takes another seat")
    return mine


def _check_admitted(run: RunConfig, token: str, peer_id: str) -> None:
    """Say how this run admits peers; refuse to start with a token that does not admit this peer."""
    if not run.admission_only:
        log.warning("run %r has no run key: it admits anyone who reaches its DHT (fine on a private network; a "
                    "public run is hosted with --run-key)", run.run_id)
        return
    problem = Admission(run.run_id, bytes.fromhex(run.run_key)).problem(token, peer_id)
    if problem is not None:
        if attacks.armed() is not None and attacks.armed().kind == "unadmitted":
            log.warning("ATTACK: taking part though not admitted (%s)", problem)
            return
        raise AdmissionError(f"your --token does not admit this peer ({peer_id}) to run {run.run_id!r}: {problem}"
                             + (". A token for one peer id holds for that identity only: start with the --identity "
                                "key file whose peer id the host admitted" if "a token for peer" in problem else ""))
    log.warning("run %r admits only token holders; this peer's token: %s", run.run_id,
                Token.parse(token).describe())


def _readings(future, peer: Peer) -> list[ClockReading]:
    """`_live` from a finished `request_progress`."""
    try:
        records = decode_progress(future.result())
    except Exception as e:  # a failed DHT lookup only delays alignment
        log.warning("could not read the swarm's progress: %r", e)
        return []
    return _live(records, peer)


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


def _wait_for_swarm(peer: Peer) -> list[ClockReading]:
    """Announce this peer; wait until `opts.wait_for_peers` peers are present or the run is under way.

    Peers that wait for each other start together: at START_MARGIN_S after the
    last one announced itself (every peer reads the same announcements).
    Returns the clock readings of the peers already training (empty: this peer starts the run).
    """
    dht, run_id, peer_id, opts = peer.dht, peer.run.run_id, peer.peer_id, peer.opts
    announced = time.time()
    deadline = time.monotonic() + opts.config_timeout
    while True:
        publish_progress(dht, run_id, PeerProgress(peer_id, 0, time=announced, training=False, token=opts.token,
                                                   device=peer.device_description))
        records = _admitted(fetch_progress(dht, run_id), peer)  # (an unadmitted peer is not waited for)
        training = _live(records, peer)
        waiting = {p.peer_id: p.time for p in records if not p.training} | {peer_id: announced}
        if training or peer.stopping or opts.wait_for_peers <= 1:
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
    held = list(outer.base_round) if resumed else outer.adopt_swarm_state(step, JOIN_BACKING_WAIT_S)
    return {"rounds_held": held, "step": step}


def _print_progress(opts: JoinOptions, p: PeerProgress, failed: list[int], figures: dict) -> None:
    if opts.progress_json:
        print(json.dumps({"peer_id": p.peer_id, "step": p.step, "global_step": int(p.global_step),
                          "rounds": p.rounds, "failed": sum(failed), "loss": p.loss, "tokens_per_s": p.tokens_per_s,
                          "bytes_sent": p.bytes_sent, "mfu": figures["mfu"],
                          "gpu_memory_mb": figures["gpu_memory_mb"]}), flush=True)
    else:
        rounds = "/".join(map(str, p.rounds))
        gpu = ""
        if figures["gpu_memory_mb"] is not None:
            gpu = f"  GPU {figures['gpu_memory_mb'] / 1024:.1f} GiB"
        if figures["mfu"] is not None:
            gpu += f"  MFU {100 * figures['mfu']:.1f} %"
        print(f"step {p.step:6d}  global {int(p.global_step):6d}  rounds {rounds} (failed {sum(failed)})  "
              f"loss {p.loss:.4f}  "
              f"{p.tokens_per_s:8.0f} tok/s{gpu}  sent {p.bytes_sent / 1e6:8.2f} MB", file=sys.stderr, flush=True)
