"""`simulate --replay RUN_DIR` (`task/replay.py`): a recorded swarm's schedule read back from its metrics files and
replayed — each worker makes its inner steps at the global steps its peer made them, takes part in the rounds its
peer applied and no other, and takes each mean at the step its peer applied it; bad records are refused by name."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from p2p_diloco.core.averaging import RoundKey
from p2p_diloco.core.config import ConfigError, DiLoCoConfig
from p2p_diloco.core.schedule import Schedule
from p2p_diloco.node.records import RunConfig
from p2p_diloco.task.data import Corpus, data_seed
from p2p_diloco.task.model import PRESETS
from p2p_diloco.task.replay import ReplayScript, check_data, comparison_table, read_run
from p2p_diloco.task.simulate import SimSettings, replay, run_method

STEPS = 120
CONFIG = DiLoCoConfig(outer_period=20, fragments=2, tau=1, total_steps=STEPS, warmup_steps=10)


def _keys() -> list[tuple[int, int, int]]:
    """(fragment, round, start step) of every round of the run, the final ones (at STEPS) included."""
    schedule = Schedule(CONFIG)
    keys = [(k, r, t) for t in range(1, STEPS + 1) for k, r in schedule.due(t)]
    final = [(k, schedule.next_round(k, STEPS), STEPS) for k in range(len(CONFIG.offsets()))
             if schedule.round_at(k, STEPS) is None]
    return keys + final


def record_run(path, trained_at: dict[str, list[int]], missed: dict[str, set], delay: int = 3,
               adopted: dict[str, set] | None = None) -> None:
    """A run directory as a local swarm leaves it: its run config and a metrics file per peer, whose lines hold
    `trained_at` and the round records (every round applied `delay` steps after its start, but those in
    `missed[peer]`, which failed; the agreed states of those in `adopted[peer]` were then taken from the others)."""
    path.mkdir(exist_ok=True)
    (path / "run_config.msgpack").write_bytes(
        RunConfig("replayed", CONFIG, PRESETS["tiny"], batch_size=2, data="the stdlib sources").encode())
    keys = _keys()
    for peer, steps in trained_at.items():
        takers = {(k, r): sum((k, r) not in missed[p] for p in trained_at) for k, r, _ in keys}
        records = [{"fragment": k, "round": r, "start_step": t, "end_step": min(t + delay, STEPS),
                    "outcome": "failed" if (k, r) in missed[peer] else "applied", "tokens": 64,
                    "peers": takers[(k, r)], "group_weight": 128.0} for k, r, t in keys]
        records += [{"fragment": k, "round": r, "start_step": t + delay, "end_step": t + delay, "outcome": "adopted",
                     "tokens": 0, "peers": 0, "group_weight": 0.0}
                    for k, r, t in keys if (k, r) in (adopted or {}).get(peer, ())]
        lines = []
        for i in range(0, len(steps), 25):  # a line every 25 inner steps, the last with the eval loss
            lines.append({"peer_id": peer, "step": i, "global_step": STEPS, "trained_at": steps[i:i + 25],
                          "round_records": records if i == 0 else [], "eval_loss": None})
        lines[-1]["eval_loss"] = 3.5
        (path / f"metrics-{peer}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_a_replay_trains_and_averages_as_the_recorded_peers_did(tmp_path):
    # QmA at every global step; QmB every other one, twice at step 60, and it missed two rounds
    fast, slow = list(range(STEPS)), [g for g in range(0, STEPS, 2)] + [60]
    missed = {"QmA": set(), "QmB": {(0, 2), (1, 3)}}
    record_run(tmp_path / "run", {"QmA": fast, "QmB": sorted(slow)}, missed, adopted=missed)
    recorded = read_run(str(tmp_path / "run"))
    assert [p.peer_id for p in recorded.peers] == ["QmA", "QmB"] and recorded.steps == STEPS
    assert [p.data_seed for p in recorded.peers] == [data_seed("QmA"), data_seed("QmB")]
    script = ReplayScript(recorded)
    assert [script.steps(1, t) for t in (60, 61, 62)] == [0, 2, 0]  # (an inner step at global step g: tick g + 1)
    assert sum(script.steps(0, t) for t in range(1, STEPS + 1)) == STEPS and script.groups_differ == 0

    settings = SimSettings(workers=2, steps=STEPS, batch_size=2, eval_every=40, final_eval_batches=4,
                           replay=str(tmp_path / "run"))
    result = run_method("streaming_diloco", settings)
    assert result["inner_steps"] == [STEPS, len(slow)]
    rounds = len(_keys())
    # the peer that missed two rounds took the others' states of them instead (the board: the swarm's records)
    assert result["rounds_applied_per_worker"] == [rounds, rounds]
    assert result["rounds_recovered_per_worker"] == [0, 2]
    assert result["consensus"] and result["groups_differ"] == 0
    assert result["config"] == CONFIG.to_dict()  # the run's own config, not the simulator's defaults


def test_a_replayed_worker_takes_only_the_states_its_peer_took(tmp_path):
    # QmB missed rounds (0, 2) and (1, 3) but only got the others' state of (0, 2): a replay that let it fetch
    # (1, 3) as well would average it more than the swarm did
    missed = {"QmA": set(), "QmB": {(0, 2), (1, 3)}}
    steps = list(range(STEPS))
    record_run(tmp_path / "run", {"QmA": steps, "QmB": steps}, missed, adopted={"QmB": {(0, 2)}})
    script = ReplayScript(read_run(str(tmp_path / "run")))
    assert not script.away_from(RoundKey("replayed", 0, 2), 1) and script.away_from(RoundKey("replayed", 1, 3), 1)
    settings = SimSettings(workers=2, steps=STEPS, batch_size=2, eval_every=40, final_eval_batches=4,
                           replay=str(tmp_path / "run"))
    report = replay(settings)
    result, rounds = report["methods"]["replay"], len(_keys())
    assert result["rounds_recovered_per_worker"] == [0, 1]
    assert result["rounds_applied_per_worker"] == [rounds, rounds - 1]
    # it averaged round (1, 4) from a stale anchor and never took the others' state: the replay ends apart, as such
    # a swarm did, and compares each worker with its own peer
    assert not result["consensus"] and len(result["eval_loss_per_worker"]) == 2
    per_peer, apart = report["comparison"]["per_peer"], result["eval_loss_per_worker"]
    assert per_peer == [pytest.approx(r / 3.5 - 1) for r in apart]
    assert report["comparison"]["difference"] == pytest.approx(sum(apart) / len(apart) / 3.5 - 1)
    assert "peer by peer" in comparison_table(report)


def test_a_round_the_swarm_split_into_two_groups_is_split_the_same_way(tmp_path):
    steps = list(range(STEPS))
    record_run(tmp_path / "run", {"QmA": steps, "QmB": steps, "QmC": steps}, {"QmA": set(), "QmB": set(), "QmC": set()})
    for peer, group in (("QmA", ["QmA", "QmB"]), ("QmB", ["QmA", "QmB"]), ("QmC", ["QmC"])):  # round (0, 2) split
        path = tmp_path / "run" / f"metrics-{peer}.jsonl"
        lines = [json.loads(t) for t in path.read_text().splitlines()]
        for rec in lines[0]["round_records"]:
            rec["members"] = ["QmA", "QmB", "QmC"]
            if (rec["fragment"], rec["round"]) == (0, 2):
                rec["members"], rec["peers"] = group, len(group)
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    script = ReplayScript(read_run(str(tmp_path / "run")))
    split = RoundKey("replayed", 0, 2)
    assert script.group_of(split, 0) == script.group_of(split, 1) != script.group_of(split, 2)
    assert len({script.group_of(RoundKey("replayed", 0, 3), w) for w in range(3)}) == 1
    assert script.groups_differ == 0  # (one group of 3 would differ from the records on all three)
    settings = SimSettings(workers=3, steps=STEPS, batch_size=2, eval_every=40, final_eval_batches=4,
                           replay=str(tmp_path / "run"))
    result = run_method("streaming_diloco", settings)
    assert result["groups_differ"] == 0 and not result["consensus"]  # fragment 0 of worker 2 went its own way


def test_a_replay_counts_the_rounds_whose_recorded_group_it_cannot_rebuild(tmp_path):
    record_run(tmp_path / "run", {"QmA": list(range(STEPS)), "QmB": list(range(STEPS))}, {"QmA": set(), "QmB": set()})
    path = tmp_path / "run" / "metrics-QmA.jsonl"
    lines = [json.loads(t) for t in path.read_text().splitlines()]
    lines[0]["round_records"][0]["peers"] = 3  # a group with a third peer whose metrics are not there
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert ReplayScript(read_run(str(tmp_path / "run"))).groups_differ == 1


@pytest.mark.parametrize("damage, error", [
    (lambda d: (d / "run_config.msgpack").unlink(), "no run config"),
    (lambda d: (d / "run_config.msgpack").write_bytes(b"\x93junk"), "run_config.msgpack"),
    (lambda d: [f.unlink() for f in d.glob("metrics-*")], "no metrics-"),
    (lambda d: _edit(d, lambda lines: lines.insert(1, "{not json\n")), "metrics-QmA.jsonl:2: not a metrics line"),
    (lambda d: _edit(d, lambda lines: lines.__setitem__(0, json.dumps({"peer_id": "QmA", "global_step": 1}) + "\n")),
     "metrics-QmA.jsonl:1: no trained_at"),
    (lambda d: _edit(d, lambda lines: lines.__setitem__(0, lines[0].replace('"trained_at": [0', '"trained_at": [-4'))),
     "trained_at -4 is not a step"),
    (lambda d: _edit(d, lambda lines: lines.__setitem__(0, lines[0].replace('"round": 0', '"round": "x"'))),
     "round 'x' is not a step"),
])
def test_bad_records_are_refused_by_name(tmp_path, damage, error):
    run = tmp_path / "run"
    record_run(run, {"QmA": list(range(STEPS)), "QmB": list(range(STEPS))}, {"QmA": set(), "QmB": set()})
    damage(run)
    with pytest.raises(ConfigError, match=error):
        read_run(str(run))


def test_a_replay_that_would_read_other_data_than_the_swarm_is_refused(tmp_path):
    run = tmp_path / "run"
    record_run(run, {"QmA": list(range(STEPS))}, {"QmA": set()})
    _edit(run, lambda lines: lines.__setitem__(0, lines[0].replace('"peer_id": "QmA"',
                                                                   '"peer_id": "QmA", "data": "dataset d (9 rows)"')))
    with pytest.raises(ConfigError, match="peer QmA read dataset d .9 rows.; this replay would read Python"):
        check_data(read_run(str(run)), Corpus.load(None).description)


def test_a_torn_last_line_is_what_a_dying_peer_left_and_is_skipped(tmp_path):
    run = tmp_path / "run"
    record_run(run, {"QmA": list(range(STEPS)), "QmB": list(range(STEPS))}, {"QmA": set(), "QmB": set()})
    _edit(run, lambda lines: lines.append('{"peer_id": "QmA", "trained_at": [1'))
    assert len(read_run(str(run)).peers[0].trained_at) == STEPS


def test_the_cli_refuses_a_replay_with_options_the_run_decides(tmp_path):
    run = tmp_path / "run"
    record_run(run, {"QmA": list(range(STEPS))}, {"QmA": set()})
    out = subprocess.run([sys.executable, "-m", "p2p_diloco.cli", "simulate", "--replay", str(run), "--steps", "5",
                          "--fragments", "2", "--correction", "heloco"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "drop --steps, --fragments, --correction" in out.stderr, out.stderr
    out = subprocess.run([sys.executable, "-m", "p2p_diloco.cli", "simulate", "--lr-by-speed"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "--lr-by-speed divides each worker's lr by its --speeds value" in out.stderr


def test_a_replay_can_ask_what_a_lateness_bound_would_have_done(tmp_path):
    # the recorded means landed 3 steps late; with --max-delay 2 (a what-if on the run's config) they land at 2
    run = tmp_path / "run"
    record_run(run, {"QmA": list(range(STEPS)), "QmB": list(range(STEPS))}, {"QmA": set(), "QmB": set()}, delay=3)
    settings = SimSettings(workers=2, steps=STEPS, batch_size=2, eval_every=40, final_eval_batches=4,
                           replay=str(run), base={"max_delay": 2})
    assert settings.config_for("streaming_diloco").max_delay == 2
    out = subprocess.run([sys.executable, "-m", "p2p_diloco.cli", "simulate", "--replay", str(run), "--max-delay",
                          "25"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "max_delay=25: must lie in tau..H - 1 = 1..19" in out.stderr, out.stderr


def _edit(run, change) -> None:
    path = run / "metrics-QmA.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    change(lines)
    path.write_text("".join(lines))
