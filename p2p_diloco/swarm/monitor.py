"""Watching a run from its DHT records alone: who trains, how fast, the clock, the schedule, the bytes.

A `Monitor` reads the run's progress records (and its config) every `every`
seconds in a thread of its own and keeps a snapshot for the dashboard
(`node/dashboard.py`): the peers seen (live while their latest record is at most
LIVE_WITHIN_S old, dropped after), the swarm clock (the median of the live
peers' global steps extrapolated to now), each fragment's next round, the bytes
on the wire, and a bounded history of the run's totals. It trusts the records no
more than a trainer does: in an admission-only run, only admitted peers count.

With `eval_every` > 0 a second thread measures the eval loss of the swarm's agreed
parameters that often (`agreed_eval`: every fragment's agreed state downloaded,
verified by its hash, evaluated on held-out data): the page's loss over time.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections import deque

from ..core.config import ConfigError
from ..core.schedule import Schedule
from ..node.admission import Admission
from ..node.records import PeerProgress, RunConfig
from .dht import fetch_progress, fetch_run_config

log = logging.getLogger(__name__)

LIVE_WITHIN_S = 10.0  # a peer whose latest record is older has left (or stalled): off the page
HISTORY_POINTS = 720  # the run's totals over time: an hour at one reading every 5 s
EVAL_POINTS = 1000  # evals of the agreed parameters kept for the page


class Monitor:
    def __init__(self, dht, run_id: str, run_key: bytes | None = None, every: float = 1.0, eval_every: float = 0.0,
                 eval_data=None):
        """`eval_every`: seconds between two evals of the agreed parameters (0: none); `eval_data`: the run ->
        the held-out batches (`agreed_eval.held_out_batches` by default), ConfigError when it cannot have them."""
        self.dht, self.run_id, self.run_key, self.every = dht, run_id, run_key, every
        self.eval_every, self.eval_data = eval_every, eval_data
        self.evals: deque[dict] = deque(maxlen=EVAL_POINTS)
        self.eval_problem: str | None = "not measured yet" if eval_every > 0 else "off"
        self.run: RunConfig | None = None
        self.admission: Admission | None = None
        self.records: list[PeerProgress] = []
        self.read_at = 0.0
        self.error: str | None = None  # why the last read failed, for the page
        self.history: deque[dict] = deque(maxlen=HISTORY_POINTS)
        self._history_at = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="monitor", daemon=True)
        self._eval_thread = threading.Thread(target=self._eval_loop, name="agreed eval", daemon=True)
        self.evaluator = None  # `agreed_eval.AgreedEvaluator`, once `prepare_eval` made it
        self._eval_refused = False  # the held-out data could not be had: no eval in this run

    def start(self) -> "Monitor":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
        if self._eval_thread.is_alive():
            self._eval_thread.join(timeout=60.0)
        if self.evaluator is not None:
            self.evaluator.close()

    def prepare_eval(self) -> None:
        """From the main thread, now and then until it is done: once the run config is known, the held-out data
        and the evaluator (its averager processes), then the thread that measures every `eval_every` s."""
        if self.eval_every <= 0 or self.evaluator is not None or self.run is None or self._eval_refused:
            return
        from .agreed_eval import AgreedEvaluator, held_out_batches

        try:
            batches = (self.eval_data or held_out_batches)(self.run)
        except ConfigError as e:
            self.eval_problem, self._eval_refused = str(e), True
            log.warning("no eval of the agreed parameters: %s", e)
            return
        self.evaluator = AgreedEvaluator(self.dht, self.run, batches)
        self._eval_thread.start()

    def _eval_loop(self) -> None:
        """The eval loss of the agreed parameters every `eval_every` s (every few seconds until the first one)."""
        while True:
            try:
                live = {p["peer_id"] for p in self.snapshot()["peers"] if p["state"] == "training"}
                point = self.evaluator.measure(live)
            except Exception as e:  # a DHT or download hiccup: the next measurement tries again
                point, self.evaluator.problem = None, f"{type(e).__name__}: {e}"
                log.debug("eval of the agreed parameters failed: %r", e)
            if point is not None:
                point["clock"] = self.snapshot(point["time"])["clock"]
                with self._lock:
                    self.evals.append(point)
            self.eval_problem = self.evaluator.problem
            if self._stop.wait(self.eval_every if self.evals else min(self.eval_every, 5.0)):
                return

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.read()
            except Exception as e:  # a DHT hiccup: the page says so and the next read tries again
                self.error = f"{type(e).__name__}: {e}"
                log.debug("monitor read failed: %r", e)
            self._stop.wait(self.every)

    def read(self) -> None:
        """One read of the run's records (the config until it is found)."""
        if self.run is None:
            try:
                self.run = fetch_run_config(self.dht, self.run_id, timeout=self.every, run_key=self.run_key)
            except TimeoutError:
                pass
            if self.run is not None and self.run.admission_only:
                self.admission = Admission(self.run.run_id, bytes.fromhex(self.run.run_key))
        records = fetch_progress(self.dht, self.run_id)
        if self.admission is not None:
            records = [p for p in records if self.admission.problem(p.token, p.peer_id) is None]
        now = time.time()
        with self._lock:
            self.records, self.read_at, self.error = records, now, None
        if now - self._history_at >= 5.0:
            snap = self.snapshot(now)
            self._history_at = now
            point = {"time": now, "clock": snap["clock"], "peers": len(snap["peers"]),
                     "tokens_per_s": snap["tokens_per_s"], "bytes_sent": snap["bytes_sent"], "loss": snap["mean_loss"]}
            with self._lock:  # (the server's threads copy the history while this one appends)
                self.history.append(point)

    def snapshot(self, now: float | None = None) -> dict:
        """What the dashboard shows, as plain JSON-able values."""
        now = time.time() if now is None else now
        with self._lock:
            records, read_at, error, history = list(self.records), self.read_at, self.error, list(self.history)
            evals = list(self.evals)
        # on the page: a record at most LIVE_WITHIN_S old, of a peer not gone (one that trained and stopped, a
        # clean leave, says so in its last record)
        live = [p for p in records if now - p.time <= LIVE_WITHIN_S and (p.training or p.step == 0)]
        training = [p for p in live if p.training]
        rates = [p.steps_per_s for p in training if p.steps_per_s > 0]
        rate = statistics.median(rates) if rates else 0.0
        clock = statistics.median([p.global_step + rate * max(now - p.time, 0.0) for p in training]) \
            if training else None
        run = self.run
        schedule = []
        if run is not None and clock is not None:
            plan = Schedule(run.diloco)
            for k in range(len(plan.offsets)):  # (the block fragments and the embeddings' one)
                done = max((p.rounds[k] for p in training if len(p.rounds) > k), default=0)
                upcoming = plan.next_round(k, int(clock))
                schedule.append({"fragment": k, "rounds": done, "next_round": upcoming,
                                 "next_round_at": plan.offsets[k] + upcoming * plan.period})
        losses = [p.loss for p in training if _finite(p.loss)]
        peers = [{"peer_id": p.peer_id, "state": "training" if p.training else "joining", "device": p.device,
                  "step": p.step, "global_step": round(p.global_step, 1), "rounds": p.rounds,
                  "rounds_failed": p.rounds_failed, "tokens_per_s": round(p.tokens_per_s, 1),
                  "uplink_mbit": p.uplink_mbit, "bytes_sent": p.bytes_sent, "bytes_received": p.bytes_received,
                  "loss": p.loss if _finite(p.loss) else None, "last_seen_s": round(max(now - p.time, 0.0), 1),
                  "reachable": p.reachable}
                 for p in live]
        return {
            "run_id": self.run_id,
            "run": None if run is None else {
                "model": run.model.to_dict(), "outer_period": run.diloco.outer_period,
                "fragments": run.diloco.fragments, "codec": run.diloco.codec, "total_steps": run.diloco.total_steps,
                "admission_only": run.admission_only},
            "now": now, "read_s_ago": round(now - read_at, 1) if read_at else None, "error": error,
            "clock": None if clock is None else round(clock, 1),
            "peers": peers, "schedule": schedule,
            "tokens_per_s": round(sum(p.tokens_per_s for p in training), 1),
            "bytes_sent": sum(p.bytes_sent for p in live),
            "mean_loss": statistics.fmean(losses) if losses else None,
            "history": history,
            "evals": evals, "eval_problem": self.eval_problem,  # the agreed parameters' eval loss over time
        }


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def watch(dht, run_id: str, port: int, host: str, run: RunConfig | None = None, run_key: bytes | None = None,
          eval_every: float = 0.0, eval_data=None):
    """Start a `Monitor` of the run and its dashboard (`node.dashboard`); returns both (stop, then close)."""
    from ..node.dashboard import serve

    monitor = Monitor(dht, run_id, run_key, eval_every=eval_every, eval_data=eval_data)
    monitor.run = run
    if run is not None and run.admission_only:
        monitor.admission = Admission(run.run_id, bytes.fromhex(run.run_key))
    monitor.start()
    monitor.prepare_eval()  # (the run known: now; else the caller's main thread calls it until it is)
    try:
        return monitor, serve(monitor.snapshot, port, host)
    except Exception:
        monitor.stop()
        raise
