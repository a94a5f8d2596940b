"""A trainer peer: reads the run config from the DHT, trains, averages fragments with the swarm.

The loop reads like the simulator's: an inner step, then the Streaming DiLoCo
schedule; the swarm sits behind `SwarmAverager`. Ctrl-C or SIGTERM stops after
the current step: the round in flight is finished (or fails within its
timeout), progress is withdrawn, and the summary is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import torch

from ..data import BatchStream, Corpus
from ..device import pick_device
from ..fragments import split_fragments
from ..inner import InnerTrainer
from ..model import build_model, evaluate
from ..records import PeerProgress
from ..streaming import StreamingDiLoCo
from .averager import SwarmAverager
from .dht import fetch_run_config, publish_progress, start_dht

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 2.0


@dataclass
class JoinOptions:
    initial_peers: list[str]
    run_id: str = "default"
    steps: int | None = None  # None: until Ctrl-C
    bandwidth: float | None = None
    client_mode: bool = False
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    data: list[str] = field(default_factory=list)
    summary_path: str | None = None
    progress_json: bool = False  # one JSON line per progress update on stdout (for local-swarm)
    final_sync: bool = False  # one last round of every fragment at the last step (all peers stop together)
    threads: int | None = None
    config_timeout: float = 30.0


def anchor_hashes(outer: StreamingDiLoCo) -> list[str]:
    return [hashlib.sha256(a.numpy().tobytes()).hexdigest() for a in outer.anchors]


def run_peer(opts: JoinOptions) -> dict:
    if opts.threads:
        torch.set_num_threads(opts.threads)
    stop = {"now": False}

    def request_stop(signum, frame):
        stop["now"] = True

    dht = start_dht(opts.initial_peers, opts.host_maddrs, client_mode=opts.client_mode)
    averager = None
    try:
        run = fetch_run_config(dht, opts.run_id, timeout=opts.config_timeout)
        peer_id = str(dht.peer_id)
        device = pick_device()
        model = build_model(run.model, run.diloco.seed).to(device)
        corpus = Corpus.load(opts.data or None)
        eval_batches = corpus.eval_batches(run.model.seq_len, 16, 32)
        seed = int.from_bytes(hashlib.sha256(peer_id.encode()).digest()[:4], "little")
        stream = BatchStream(corpus.train, run.model.seq_len, run.batch_size, seed=seed)
        trainer = InnerTrainer(model, run.diloco)
        sizes = [f.numel for f in split_fragments(model, run.diloco.fragments)]
        averager = SwarmAverager(dht, run.run_id, sizes, run.diloco.codec, round_timeout=run.round_timeout,
                                 target_group_size=run.target_group_size, bandwidth=opts.bandwidth,
                                 client_mode=opts.client_mode)
        outer = StreamingDiLoCo(model, run.diloco, averager, run_id=run.run_id)
        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        tokens_per_step = run.batch_size * run.model.seq_len
        start = last_report = time.time()
        step, loss = 0, float("nan")
        while not stop["now"] and (opts.steps is None or step < opts.steps):
            loss = trainer.step(stream.next().to(device))
            step += 1
            outer.record_tokens(tokens_per_step)
            outer.sync(step)
            now = time.time()
            if now - last_report >= PROGRESS_EVERY_S or step == opts.steps:
                last_report = now
                progress = PeerProgress(peer_id, step, list(outer.stats.applied),
                                        step * tokens_per_step / (now - start),
                                        averager.bytes_sent, averager.bytes_received, loss)
                publish_progress(dht, run.run_id, progress)
                _report(opts, progress, outer)
        outer.finish_in_flight()
        if opts.final_sync and not stop["now"]:
            outer.start_final_rounds(step)
            outer.finish_in_flight()
        eval_model = build_model(run.model, run.diloco.seed)
        outer.load_anchors_into(eval_model)
        summary = {
            "peer_id": peer_id,
            "inner_steps": step,
            "rounds": list(outer.stats.applied),
            "rounds_failed": list(outer.stats.failed),
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


def _report(opts: JoinOptions, p: PeerProgress, outer: StreamingDiLoCo) -> None:
    if opts.progress_json:
        print(json.dumps({"peer_id": p.peer_id, "step": p.step, "rounds": p.rounds, "loss": p.loss,
                          "tokens_per_s": p.tokens_per_s, "bytes_sent": p.bytes_sent}), flush=True)
    else:
        rounds = "/".join(map(str, p.rounds))
        print(f"step {p.step:6d}  rounds {rounds}  loss {p.loss:.4f}  {p.tokens_per_s:8.0f} tok/s  "
              f"sent {p.bytes_sent / 1e6:8.2f} MB", file=sys.stderr, flush=True)
