"""The eval loss of the swarm's agreed parameters, as an onlooker measures it: for the dashboard.

Nobody publishes the agreed model; every peer publishes, per fragment, the round
it holds and the sha256 of that round's state (`state_serving`). An onlooker (the
monitor, the host's dashboard) takes each fragment's latest round that enough
peers agree on (`RoundReport.agreed`, the quorum a joiner needs), downloads that
state from a peer holding it exactly as a joiner does (verified against the
hash: a donor cannot feed it another model), writes every fragment's anchor into
a model of the run's config and evaluates it on held-out data. It trains
nothing and joins no group: its averagers run in client mode and never begin a
round. In an admission-only run the peers serve state only to admitted peers, so
an onlooker without a progress record of its own is refused (`problem` says so).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch

from ..core.averaging import RoundKey
from ..core.config import ConfigError
from ..core.fragments import split_fragments
from ..node.records import RunConfig
from ..task.model import build_model, evaluate
from .averager import SwarmAverager

log = logging.getLogger(__name__)

EVAL_BATCHES = (16, 32)  # (windows per batch, batches): the held-out windows every trainer's summary uses
NEWEST = 1 << 62  # "any round"


def held_out_batches(run: RunConfig, dataset: str | None = None, text_field: str | None = None,
                     tokenizer_dir: str | None = None) -> list[torch.Tensor]:
    """The held-out windows a trainer of `run` evaluates on: those of `dataset` (read with the run's tokenizer,
    from `tokenizer_dir`), else of the default data (the stdlib sources, byte-level); ConfigError naming what is
    missing or different."""
    from ..task.data import Corpus
    from ..task.dataset import TextDataset
    from ..task.tokenizer import HFTokenizer

    tokenizer = None
    if run.model.tokenizer:
        if not (dataset and tokenizer_dir):
            raise ConfigError(f"run {run.run_id!r} reads a dataset through its tokenizer: give the monitor the same "
                              "--dataset and --tokenizer DIR to evaluate it")
        tokenizer = HFTokenizer.load(tokenizer_dir)
        if tokenizer.sha256 != run.model.tokenizer:
            raise ConfigError(f"--tokenizer {tokenizer_dir}: it encodes differently from the run's tokenizer")
    elif tokenizer_dir:
        raise ConfigError(f"--tokenizer {tokenizer_dir}: run {run.run_id!r} is byte-level")
    window, count = EVAL_BATCHES
    if dataset:
        return TextDataset.load(dataset, text_field, None, tokenizer).eval_batches(run.model.seq_len, window, count)
    return Corpus.load().eval_batches(run.model.seq_len, window, count)


class AgreedEvaluator:
    """Made in the main thread (its averager processes are started with signal handling that only works there);
    `measure()` now and then, from any thread; `close()` at the end (it stops the averager processes)."""

    def __init__(self, dht, run: RunConfig, batches: list[torch.Tensor]):
        self.dht, self.run, self.batches = dht, run, batches
        self.model = build_model(replace(run.model, weights=""), run.diloco.seed)  # (every parameter is assigned)
        self.fragments = split_fragments(self.model, run.diloco.fragments)
        self.problem: str | None = None  # why the last measurement has no value, for the page
        self.averager = SwarmAverager(dht, run.run_id, [f.numel for f in self.fragments], run.diloco.codec,
                                      round_timeout=run.round_timeout, min_matchmaking_time=run.matchmaking_time,
                                      client_mode=True, aggregation=run.diloco.aggregation,
                                      sync_stride=run.diloco.sync_stride)

    def measure(self, live: set[str] | None = None) -> dict | None:
        """{"time", "rounds" (per fragment), "eval_loss", "download_s"} of the agreed parameters now, or None
        (with `problem` saying why) when some fragment has no agreed round yet or no holder served it. `live`: the
        peers training now (only their records vote and only they are asked); None: every record's peer."""
        if live is not None and not live:
            self.problem = "no peer is training"
            return None
        averager, started = self.averager, time.monotonic()
        averager.live_peers = live
        rounds = []
        for k, fragment in enumerate(self.fragments):
            report = averager.latest_agreed(k, NEWEST)
            digest = report.agreed() if report is not None else None
            if digest is None:
                self.problem = f"fragment {k} has no round that {report and report.quorum() or 2} peers agree on yet"
                return None
            state = averager.recover(RoundKey(self.run.run_id, k, report.round), digest)
            if state is None:
                self.problem = f"no peer served the agreed state of fragment {k}, round {report.round}" + \
                    (" (an admission-only run serves admitted trainers only)" if self.run.admission_only else "")
                return None
            fragment.assign(state.anchor)
            rounds.append(report.round)
        downloaded = time.monotonic() - started
        self.problem = None
        return {"time": time.time(), "rounds": rounds, "eval_loss": evaluate(self.model, self.batches),
                "download_s": round(downloaded, 2)}

    def close(self) -> None:
        self.averager.shutdown()
