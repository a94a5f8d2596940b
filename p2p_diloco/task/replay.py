"""A finished swarm's schedule, read back from its peers' metrics files and replayed in the simulator.

`p2p-diloco simulate --replay RUN_DIR` reads RUN_DIR (a `local-swarm` workdir, or any directory holding a run's
`run_config.msgpack` and its trainers' `metrics-PEER_ID.jsonl`, `node/metrics.py`) and trains the same model from the
same seed, each worker on its peer's own data order (its recorded `data_seed`), making its inner steps at the
global steps its peer made them (`trained_at`: the swarm clock's step each inner step's learning rate followed),
taking part in the rounds its peer applied and in no other, in the group its peer averaged in (a round the swarm
split into two groups is split the same way), each round's mean landing at the global step its peer
applied it (`round_records`: the realized delay), and taking from the others the agreed states its peer took
(`adopted`) and no other (a replayed worker could otherwise fetch every state its peer's slow link never brought
in: measured, a 1 Mbit/s peer adopted 14 states in its swarm and 29 in a replay that let it). What the swarm left
to chance (who was in a group, when a result came) is thereby fixed; what remains differs: the order in which a
butterfly sums the parts (the simulator reduces in one place), and a group whose members were not recorded (peers
older than that: the records give each applied round's group size; a replay then puts every peer that applied a
round in one group) or left no metrics: the replay counts the rounds whose group size it cannot rebuild,
`groups_differ`.
"""

from __future__ import annotations

import functools
import glob
import json
import os
from collections import Counter
from dataclasses import dataclass

from ..core.averaging import RoundKey
from ..core.config import ConfigError
from ..node.records import RecordError, RunConfig
from .data import data_seed

RUN_CONFIG = "run_config.msgpack"
MAX_METRICS_BYTES = 256 * 2**20  # a metrics file larger than this is not one a run of ours wrote


@dataclass(frozen=True)
class RecordedPeer:
    peer_id: str
    data_seed: int  # the seed of its data order (`join --data-seed`, else from its peer id)
    data: str | None  # what it read (the corpus's description; None: not recorded)
    trained_at: tuple[int, ...]  # the global step each inner step trained at, in order
    applied: dict[tuple[int, int], tuple[int, int, int]]  # (fragment, round) -> (start step, end step, group size)
    adopted: frozenset[tuple[int, int]]  # (fragment, round) of every agreed state it took from the others
    members: dict[tuple[int, int], frozenset[str]]  # (fragment, round) -> an applied round's group (where recorded)
    eval_loss: float | None  # what the peer reported at its end (the agreed parameters' held-out loss)
    global_step: int  # where its clock ended


@dataclass(frozen=True)
class RecordedRun:
    path: str
    run: RunConfig
    peers: tuple[RecordedPeer, ...]  # sorted by peer id

    @property
    def steps(self) -> int:
        """The global step the run ended at."""
        return max(p.global_step for p in self.peers)

    def summary(self) -> dict:
        losses = [p.eval_loss for p in self.peers if p.eval_loss is not None]
        return {"path": self.path, "peers": [p.peer_id for p in self.peers],
                "eval_loss": [p.eval_loss for p in self.peers],
                "eval_loss_mean": sum(losses) / len(losses) if losses else None,
                "inner_steps": [len(p.trained_at) for p in self.peers],
                "rounds_averaged": [len(p.applied) for p in self.peers], "global_step": self.steps}


@functools.lru_cache(maxsize=4)
def read_run(path: str) -> RecordedRun:
    """The run in directory `path`; ConfigError names what is missing or malformed."""
    if not os.path.isdir(path):
        raise ConfigError(f"--replay {path}: not a directory")
    try:
        with open(os.path.join(path, RUN_CONFIG), "rb") as f:
            run = RunConfig.decode(f.read())
    except OSError as e:
        raise ConfigError(f"--replay {path}: no run config ({RUN_CONFIG}: {e.strerror or e}); a local-swarm "
                          "workdir holds one") from None
    except RecordError as e:
        raise ConfigError(f"--replay {path}: {RUN_CONFIG}: {e}") from None
    files = sorted(glob.glob(os.path.join(path, "metrics-*.jsonl")))
    if not files:
        raise ConfigError(f"--replay {path}: no metrics-*.jsonl (the trainers write them with --run-dir)")
    peers = [p for p in (_read_peer(f) for f in files) if p.trained_at]
    if not peers:
        raise ConfigError(f"--replay {path}: no peer recorded an inner step")
    return RecordedRun(path, run, tuple(sorted(peers, key=lambda p: p.peer_id)))


def _read_peer(path: str) -> RecordedPeer:
    if os.path.getsize(path) > MAX_METRICS_BYTES:
        raise ConfigError(f"{path}: over {MAX_METRICS_BYTES} bytes")
    peer_id, seed, data, trained_at, applied, eval_loss, global_step = None, None, None, [], {}, None, 0
    adopted, members = set(), {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, text in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = json.loads(text)
                if not isinstance(line, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                if not text.endswith("\n"):
                    break  # the last line of a peer that died while writing it
                raise ConfigError(f"{where}: not a metrics line ({e})") from None
            if "trained_at" not in line:
                raise ConfigError(f"{where}: no trained_at (written by a peer older than replays)")
            peer_id = _field(line, "peer_id", str, where)
            if "data_seed" in line:
                seed = _int(line["data_seed"], where, "data_seed")
            if "data" in line:
                data = _field(line, "data", str, where)
            trained_at += [_int(g, where, "trained_at") for g in _field(line, "trained_at", list, where)]
            global_step = max(global_step, _int(line.get("global_step"), where, "global_step"))
            for r in _field(line, "round_records", list, where):
                if not isinstance(r, dict):
                    raise ConfigError(f"{where}: a round record is not an object")
                if r.get("outcome") in ("applied", "adopted"):
                    key = (_int(r.get("fragment"), where, "fragment"), _int(r.get("round"), where, "round"))
                if r.get("outcome") == "adopted":
                    adopted.add(key)
                elif r.get("outcome") == "applied":
                    applied[key] = (_int(r.get("start_step"), where, "start_step"),
                                    _int(r.get("end_step"), where, "end_step"), _int(r.get("peers"), where, "peers"))
                    if "members" in r:
                        group = r["members"]
                        if not isinstance(group, list) or not all(isinstance(m, str) for m in group):
                            raise ConfigError(f"{where}: a round record's members are not a list of peer ids")
                        members[key] = frozenset(group)
            if isinstance(line.get("eval_loss"), (int, float)):
                eval_loss = float(line["eval_loss"])
    if peer_id is None:
        raise ConfigError(f"{path}: no metrics lines")
    return RecordedPeer(peer_id, data_seed(peer_id) if seed is None else seed, data, tuple(trained_at), applied,
                        frozenset(adopted), members, eval_loss, global_step)


def check_data(recorded: RecordedRun, description: str) -> None:
    """Refuse a replay that would read other data than the swarm did (`description`: the corpus it would read)."""
    for p in recorded.peers:
        if p.data is not None and p.data != description:
            raise ConfigError(f"--replay {recorded.path}: peer {p.peer_id} read {p.data}; this replay would read "
                              f"{description} (give simulate the swarm's --data; a --dataset run cannot be replayed)")


def _field(line: dict, name: str, kind: type, where: str):
    value = line.get(name)
    if not isinstance(value, kind):
        raise ConfigError(f"{where}: {name} is {type(value).__name__}, expected {kind.__name__}")
    return value


def _int(value, where: str, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{where}: {name} {value!r} is not a step, round or count")
    return value


class ReplayScript:
    """A `SwarmScript` read from a recorded run (the simulator's tick t is the swarm's global step t: an inner step
    trained at global step g belongs to tick g + 1, before the rounds due at g + 1 start, as in the peer's loop)."""

    scripted = True

    def __init__(self, recorded: RecordedRun):
        self.recorded = recorded
        self.workers = len(recorded.peers)
        self._steps = [Counter(g + 1 for g in p.trained_at) for p in recorded.peers]
        self._applied = [p.applied for p in recorded.peers]
        self._adopted = [p.adopted for p in recorded.peers]
        index = {p.peer_id: w for w, p in enumerate(recorded.peers)}
        # a round's group as recorded (peers without records left out); a peer that applied it without naming its
        # members: with every other such peer
        self._groups = [{key: frozenset(index[m] for m in group if m in index) for key, group in p.members.items()}
                        for p in recorded.peers]
        together = Counter((k, self._group(k, w)) for w, a in enumerate(self._applied) for k in a)
        self.groups_differ = sum(1 for w, a in enumerate(self._applied) for k, (_, _, size) in a.items()
                                 if size != together[(k, self._group(k, w))])

    def _group(self, key: tuple[int, int], worker: int) -> frozenset[int] | None:
        return self._groups[worker].get(key)

    def group_of(self, key: RoundKey, worker: int) -> int:
        """Which group of round `key` `worker` averages in (the same number for the same recorded group; a swarm's
        round can form two: a 1 Mbit/s peer that answers late, the others gone on without it)."""
        group = self._group((key.fragment, key.round), worker)
        return -1 if not group else min(group)

    def steps(self, worker: int, tick: int) -> int:
        return self._steps[worker].get(tick, 0)

    def absent(self, key: RoundKey, worker: int) -> bool:
        return (key.fragment, key.round) not in self._applied[worker]

    def away_from(self, key: RoundKey, worker: int) -> bool:
        """Whether `worker` cannot fetch the agreed state of round `key`: unless its peer took that state from the
        others (`adopted`), it could not (a slow link's download that never came in): the replay's does not either."""
        return (key.fragment, key.round) not in self._adopted[worker]

    def ready_at(self, key: RoundKey, worker: int) -> int | None:
        found = self._applied[worker].get((key.fragment, key.round))
        return None if found is None else found[1]


def comparison(recorded: RecordedRun, result: dict) -> dict:
    """The swarm beside its replay: the replay's eval loss against the mean of the peers' (which agree when the swarm
    ended in consensus); a swarm that ended apart: the mean of the replay's workers' against it, and worker by worker
    (`per_peer`: replay / swarm - 1 each)."""
    swarm = recorded.summary()
    mean = swarm["eval_loss_mean"]
    apart = result.get("eval_loss_per_worker")
    replayed = sum(apart) / len(apart) if apart else result["eval_loss"]  # (apart: the workers' mean, as the peers')
    report = {"swarm": swarm, "replay_eval_loss": replayed, "difference": None if mean is None else replayed / mean - 1}
    if apart:
        report["per_peer"] = [None if s is None else r / s - 1 for r, s in zip(apart, swarm["eval_loss"])]
    return report


def comparison_table(report: dict) -> str:
    swarm, replay = report["swarm"], report["methods"]["replay"]
    averaged = [a - r for a, r in zip(replay["rounds_applied_per_worker"], replay["rounds_recovered_per_worker"])]
    rows = [f"{'':>8} {'eval_loss':>9} {'inner steps per worker':>28} {'rounds averaged per worker':>28}",
            f"{'swarm':>8} {_loss(swarm['eval_loss_mean']):>9} {_ints(swarm['inner_steps']):>28} "
            f"{_ints(swarm['rounds_averaged']):>28}",
            f"{'replay':>8} {report['comparison']['replay_eval_loss']:9.4f} {_ints(replay['inner_steps']):>28} "
            f"{_ints(averaged):>28}"]
    diff = report["comparison"]["difference"]
    rows.append(f"replay vs swarm: {'-' if diff is None else f'{100 * diff:+.2f} %'} eval loss; "
                f"consensus {replay['consensus']}; rounds whose recorded group size differs from the replay's: "
                f"{replay['groups_differ']}")
    if report["comparison"].get("per_peer"):
        rows.append("the swarm ended apart; peer by peer (replay worker vs its peer): " + ", ".join(
            f"{_loss(s)} / {r:.4f} ({'-' if d is None else f'{100 * d:+.2f} %'})" for s, r, d in
            zip(swarm["eval_loss"], replay["eval_loss_per_worker"], report["comparison"]["per_peer"])))
    return "\n".join(rows)


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _ints(values: list[int]) -> str:
    return "/".join(str(v) for v in values)
