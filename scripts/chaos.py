"""Chaos runner: a local swarm whose peers are killed, stopped, and replaced at random, reproducibly by seed.

A host and --peers trainers run a Streaming DiLoCo run of --steps global steps on
127.0.0.1. Every ~--fault-every seconds (exponential gaps, drawn from --seed) one
live trainer gets a fault: SIGKILL (a crash), SIGTERM (a clean leave; it comes
back with `--resume` from its checkpoint) or SIGSTOP (a stall of 5-15 s, then
SIGCONT). A crashed or departed trainer is replaced by a new one a few seconds
later, so the swarm keeps about --peers members. At the end it reports rounds
applied and failed per fragment, every round that did not average with its
reason (from the logs), inner steps lost with crashed peers, every joiner's
time-to-join, whether the surviving peers hold identical anchors, and their eval
loss against an undisturbed run of the same length on loopback (run after the
chaotic one, unless --baseline-json names a report of one).

With --links (root), every member runs on an emulated machine behind its WAN link
(see `p2p_diloco.emulation.wan`); a crashed trainer's replacement, or a departed
one coming back, takes over its machine.

    python scripts/chaos.py --seed 1 --steps 6000 --json results/chaos.json
    sudo python scripts/chaos.py --links peers/links-mixed.toml --json results/chaos_wan.json
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import random
import re
import signal
import threading
import time

from p2p_diloco.core.config import DiLoCoConfig
from p2p_diloco.emulation.links import LinksError, read_links
from p2p_diloco.node.records import RunConfig
from p2p_diloco.swarm.local_swarm import LocalSwarm, TrainerProcess
from p2p_diloco.task.model import model_spec


class Trainer:
    """A trainer of the chaotic run: its process (progress read as it comes) and its fate."""

    def __init__(self, swarm: LocalSwarm, name: str, maddr: str, wait_for: int, extra: list[str], machine: int):
        self.process = TrainerProcess(*swarm.start_trainer(name, maddr, wait_for, extra, machine=machine))
        self.machine = machine  # its emulated machine (with --links: its link); a replacement takes it over
        threading.Thread(target=self.process.read_progress, daemon=True).start()
        self.name, self.child, self.summary = name, self.process.child, self.process.summary_path
        self.fate = "running"  # running, stopped (SIGSTOP), killed (SIGKILL) or left (SIGTERM)
        self.checkpoint = ""

    @property
    def last(self) -> dict:
        return self.process.progress or {}

    def alive(self) -> bool:
        return self.child.proc.poll() is None


class Chaos:
    """One chaotic run: the swarm, its trainers (dead ones too), the faults to come and what happened."""

    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        run = RunConfig("chaos", DiLoCoConfig(total_steps=args.steps), model_spec(args.model), 4, "stdlib",
                        round_timeout=args.round_timeout, target_group_size=None, matchmaking_time=3.0)
        links = read_links(args.links, args.peers) if args.links else None
        self.swarm = LocalSwarm(run, args.peers, args.steps, workdir=args.workdir, links=links)
        self.events: list[dict] = []
        self.trainers: list[Trainer] = []
        self.pending: list[tuple[float, str, Trainer]] = []  # (when, action, the trainer it follows up on)
        self.start = time.monotonic()
        self.maddr = ""

    def run(self) -> dict:
        args = self.args
        try:
            self.swarm.open_network()
            self.maddr = self.swarm.start_host()
            for machine in range(1, args.peers + 1):
                self.new_trainer(machine, wait_for=args.peers)
            next_fault = time.monotonic() + 20 + self.rng.expovariate(1 / args.fault_every)
            while any(t.alive() for t in self.trainers if t.fate in ("running", "stopped")):
                now = time.monotonic()
                if now - self.start > args.timeout:
                    raise TimeoutError(f"the chaos run did not end in {args.timeout:.0f}s; "
                                       f"logs in {self.swarm.workdir}")
                running = [t for t in self.trainers if t.fate == "running" and t.alive() and t.last]
                near_end = any(t.last.get("global_step", 0) > 0.9 * args.steps for t in running)
                self.do_due_actions(now, near_end)
                if now >= next_fault and running and not near_end:
                    self.fault(self.rng.choice(running), now)
                    next_fault = now + self.rng.expovariate(1 / args.fault_every)
                time.sleep(0.5)
            return self.report(time.monotonic() - self.start)
        finally:
            self.swarm.stop()

    def log(self, what: str, name: str) -> None:
        self.events.append({"t": round(time.monotonic() - self.start, 1), "event": what, "peer": name})
        print(f"[{self.events[-1]['t']:7.1f}s] {what:8s} {name}", flush=True)

    def new_trainer(self, machine: int, wait_for: int = 1, resume: str | None = None) -> Trainer:
        name = f"peer{len(self.trainers) + 1}"
        ckpt = os.path.join(self.swarm.workdir, f"ckpt-{name}")
        extra = ["--resume", resume] if resume else ["--checkpoint-dir", ckpt, "--checkpoint-every", "10"]
        t = Trainer(self.swarm, name, self.maddr, wait_for, extra, machine)
        t.checkpoint = resume or ckpt
        self.trainers.append(t)
        self.log("join" if not resume else "resume", name)
        return t

    def do_due_actions(self, now: float, near_end: bool) -> None:
        """Resume stalled trainers; replace crashed ones; restart departed ones from their checkpoints."""
        for item in [p for p in self.pending if p[0] <= now]:
            self.pending.remove(item)
            _, action, t = item
            if near_end and action != "cont":
                continue  # a newcomer would arrive after the run's last round
            if action == "cont":
                os.kill(t.child.proc.pid, signal.SIGCONT)
                t.fate = "running"
                self.log("resumed", t.name)
            elif action == "replace":  # a new volunteer on the crashed one's machine
                self.new_trainer(t.machine)
            elif action == "restart":
                self.new_trainer(t.machine, resume=t.checkpoint)

    def fault(self, victim: Trainer, now: float) -> None:
        """SIGKILL (replaced in 3-10 s), SIGTERM (back from its checkpoint in 15-25 s) or SIGSTOP (5-15 s)."""
        kind = self.rng.choice(["SIGKILL", "SIGTERM", "SIGSTOP"])
        if kind == "SIGKILL":
            os.killpg(victim.child.proc.pid, signal.SIGKILL)
            victim.fate = "killed"
            self.pending.append((now + self.rng.uniform(3, 10), "replace", victim))
        elif kind == "SIGTERM":
            os.kill(victim.child.proc.pid, signal.SIGTERM)
            victim.fate = "left"
            self.pending.append((now + self.rng.uniform(15, 25), "restart", victim))
        else:
            os.kill(victim.child.proc.pid, signal.SIGSTOP)
            victim.fate = "stopped"
            self.pending.append((now + self.rng.uniform(5, 15), "cont", victim))
        self.log(kind, victim.name)

    def report(self, wall: float) -> dict:
        args = self.args
        finished, lost = [], 0
        for t in self.trainers:
            if t.fate == "killed":
                lost += t.last.get("step", 0)
                continue
            if t.child.proc.returncode == 0 and os.path.exists(t.summary) and t.fate == "running":
                with open(t.summary) as f:
                    finished.append({"name": t.name, **json.load(f)})
        if not finished:
            raise RuntimeError(f"no trainer finished; logs in {self.swarm.workdir}")
        hashes = {tuple(p["state_sha256"]) for p in finished}
        return {"seed": args.seed, "peers": args.peers, "steps": args.steps, "wall_s": round(wall, 1),
                "faults": [e for e in self.events if e["event"] in ("SIGKILL", "SIGTERM", "SIGSTOP")],
                "events": self.events, "consensus": len(hashes) == 1,
                "rounds_applied": [p["rounds"] for p in finished],
                "rounds_failed": [p["rounds_failed"] for p in finished],
                "inner_steps_lost_with_crashed_peers": lost,
                "time_to_join_s": {p["name"]: p["time_to_join_s"] for p in finished if p["joined_at_step"] > 0},
                "eval_loss": [p["eval_loss"] for p in finished], "workdir": self.swarm.workdir,
                "links": self.args.links,
                "rounds_not_averaged": rounds_not_averaged(self.swarm.workdir)}


# how a trainer's log says that a round did not average here (core/streaming.py)
NOT_AVERAGED = re.compile(r"round could not start for fragment \d+: (.*)|round failed here \((.*)\); adopted"
                          r"|round not applied, fragment \d+ keeps its anchor: (.*)"
                          r"|holds round \d+; (.*): sitting out round")


def rounds_not_averaged(workdir: str) -> dict:
    """Every round that did not average, from every trainer's log: counted by reason (peer ids, numbers and
    round keys blanked so that alike reasons count together), with the peers each reason was seen on."""
    reasons: collections.Counter = collections.Counter()
    seen_on: dict[str, set] = collections.defaultdict(set)
    for path in sorted(glob.glob(os.path.join(workdir, "peer*.log"))):
        with open(path, errors="replace") as f:
            for line in f:
                m = NOT_AVERAGED.search(line)
                if not m:
                    continue
                text = next(g for g in m.groups() if g is not None)
                text = re.sub(r"\S+/fragment\d+/round\d+:? ?", "", text)
                text = re.sub(r"12D3Koo\w+|Qm\w{20,}", "<peer>", text)
                text = re.sub(r"\d+(\.\d+)?", "N", text)[:160]
                reasons[text] += 1
                seen_on[text].add(os.path.basename(path).removesuffix(".log"))
    return {r: {"count": n, "peers": sorted(seen_on[r])} for r, n in reasons.most_common()}


def baseline(args) -> float:
    run = RunConfig("calm", DiLoCoConfig(total_steps=args.steps), model_spec(args.model), 4, "stdlib",
                    round_timeout=args.round_timeout, target_group_size=None, matchmaking_time=3.0)
    report = LocalSwarm(run, args.peers, args.steps).run_all(args.timeout, show_progress=False)
    return report["peers"][0]["eval_loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peers", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6000, help="Global steps of the run.")
    parser.add_argument("--fault-every", type=float, default=30.0, help="Mean seconds between faults.")
    parser.add_argument("--model", default="small")
    parser.add_argument("--links", default=None,
                        help="a links file (peers/links-*.toml, root only): every member on an emulated machine behind "
                             "its link; a trainer's replacement runs on its machine")
    parser.add_argument("--round-timeout", type=float, default=30.0)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--baseline-json", default=None, help="A report of an undisturbed run (skips running one).")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()
    try:
        chaos = Chaos(args)
    except LinksError as e:
        parser.error(str(e))
    report = chaos.run()
    if args.baseline_json:
        with open(args.baseline_json) as f:
            calm = json.load(f)["baseline_eval_loss"]
    else:
        print("undisturbed run of the same length...", flush=True)
        calm = baseline(args)
    report["baseline_eval_loss"] = calm
    report["eval_loss_vs_baseline"] = round(max(report["eval_loss"]) / calm - 1, 4)
    print(json.dumps({k: v for k, v in report.items() if k != "events"}, indent=1))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
