"""The live dashboard (`host --dashboard`, `monitor`): its server, and the page in a real headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from p2p_diloco.core.config import DiLoCoConfig
from p2p_diloco.node.dashboard import DashboardError, serve
from p2p_diloco.node.records import RunConfig
from p2p_diloco.swarm.local_swarm import LocalSwarm
from p2p_diloco.task.model import model_spec
from processes import p2pd_pids

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


def test_the_server_serves_the_page_and_the_snapshot_and_nothing_else():
    page = serve(lambda: {"run_id": "r", "peers": []}, 0)
    try:
        base = f"http://127.0.0.1:{page.port}"
        status, kind, body = get(base + "/")
        assert status == 200 and kind.startswith("text/html") and b"<table id=\"peers\">" in body
        status, kind, body = get(base + "/api/swarm")
        assert status == 200 and kind == "application/json" and json.loads(body) == {"run_id": "r", "peers": []}
        assert get(base + "/etc/passwd")[0] == 404
        request = urllib.request.Request(base + "/api/swarm", data=b"x", method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=5)
        assert e.value.code == 405
        with pytest.raises(DashboardError, match=f"--dashboard {page.port}: cannot listen on 127.0.0.1"):
            serve(dict, page.port)
    finally:
        page.close()


def _read(stream, into: list[dict]) -> None:
    for line in stream:
        try:
            into.append(json.loads(line))
        except ValueError:
            pass


def _peer_id(lines: list[dict]) -> str | None:
    return next((r["peer_id"] for r in lines if "maddrs" in r), None)


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER) and os.environ.get("P2P_DILOCO_BROWSER_TEST") != "required",
                    reason="needs Debian's chromium and chromium-driver (.ci/run installs them, and requires them)")
def test_the_page_shows_every_peer_within_5_s_of_its_join_and_drops_it_within_15_s_of_its_exit(tmp_path):
    """A host with --dashboard, two trainers joining (each in its own time), one SIGKILLed: the page in headless
    Chromium (driven through selenium) lists each within 5 s of its announcing itself and drops the dead one
    within 15 s; a screenshot goes with the test's output."""
    assert CHROMIUM and CHROMEDRIVER, "chromium and chromedriver are required here (P2P_DILOCO_BROWSER_TEST)"
    from selenium import webdriver

    before = p2pd_pids()
    port = free_port()
    run = RunConfig("dash", DiLoCoConfig(total_steps=100000, fragments=2), model_spec("tiny"), 4, "stdlib",
                    round_timeout=20.0,
                    target_group_size=None, matchmaking_time=3.0)
    swarm = LocalSwarm(run, 2, 100000, workdir=str(tmp_path / "swarm"), dashboard=port)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1400,1150", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(arg)
    driver = None
    try:
        maddr = swarm.start_host(["--eval-every", "3"])
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
        driver.get(f"http://127.0.0.1:{port}/")

        def rows() -> dict[str, str]:  # peer id -> its row's text, read at once (the page redraws every second)
            return driver.execute_script("const out = {}; for (const r of document.querySelectorAll('#peers tbody tr'))"
                                         " out[r.dataset.peer] = r.innerText; return out;")

        def text(element_id: str) -> str:
            return driver.execute_script("return document.getElementById(arguments[0]).textContent;", element_id)

        def until(condition, limit: float, what: str) -> float:
            start = time.monotonic()
            while not condition():
                assert time.monotonic() - start < limit, f"{what} took over {limit} s; page: {rows()}"
                time.sleep(0.1)
            return time.monotonic() - start

        # the two start up together (a start-up takes 10-20 s on a loaded machine) and announce themselves each
        # in its own time: each must be on the page within 5 s of its own announcement
        trainers, lines, announced, seen = {}, {}, {}, {}
        for name in ("peer0", "peer1"):
            child, _ = swarm.start_trainer(name, maddr, 1, ["--step-delay", "0.05"])
            lines[name] = []
            threading.Thread(target=_read, args=(child.proc.stdout, lines[name]), daemon=True).start()
            trainers[name] = (child, None)
        started = time.monotonic()
        while len(seen) < len(trainers):
            page = rows()
            now = time.monotonic()
            for name, (child, peer_id) in trainers.items():
                if peer_id is None:
                    peer_id = _peer_id(lines[name])
                    if peer_id is None:
                        assert now - started < 120, f"{name}'s start-up took over 120 s"
                        continue
                    trainers[name], announced[name] = (child, peer_id), now
                if name in seen:
                    continue
                if peer_id in page:
                    seen[name] = now - announced[name]
                else:
                    assert now - announced[name] < 5.0, f"{name} on the page took over 5.0 s; page: {page}"
            time.sleep(0.1)
        until(lambda: text("run-id") == "dash", 5.0, "the run id")
        until(lambda: text("clock") not in ("", "–"), 15.0, "the swarm clock")
        # the eval loss of the agreed parameters: every fragment's agreed state downloaded by the host, evaluated
        evaluated = until(lambda: text("eval-loss") not in ("", "–"), 90.0, "an eval of the agreed parameters")
        loss = float(text("eval-loss"))
        assert 0 < loss < 5.6, loss  # (the tiny byte model starts at ln 256 = 5.55)
        snap = json.loads(get(f"http://127.0.0.1:{port}/api/swarm")[2])
        point = snap["evals"][-1]
        assert len(point["rounds"]) == 3 and min(point["rounds"]) >= 0 and point["clock"] is not None, point
        print(f"eval of the agreed parameters on the page {evaluated:.1f} s after both peers were: {point}")
        until(lambda: driver.execute_script("return document.querySelectorAll('#eval-chart circle').length;") >= 2,
              30.0, "a second eval on the page")
        shot = tmp_path / "dashboard.png"
        driver.save_screenshot(str(shot))
        print(f"dashboard screenshot: {shot} (peers on the page {seen['peer0']:.1f} s and {seen['peer1']:.1f} s "
              "after they announced themselves)")
        with open(shot, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        os.killpg(trainers["peer1"][0].proc.pid, signal.SIGKILL)
        gone = until(lambda: trainers["peer1"][1] not in rows(), 15.0, "peer1's going off the page")
        print(f"peer1 off the page {gone:.1f} s after its SIGKILL")
        cells = rows()[trainers["peer0"][1]]
        assert "training" in cells and "cpu" in cells, cells
    finally:
        if driver is not None:
            driver.quit()
        swarm.stop()
        assert p2pd_pids() <= before, "p2pd left behind"


def test_the_snapshot_lists_live_peers_only_with_the_clock_and_the_schedule():
    from p2p_diloco.node.records import PeerProgress
    from p2p_diloco.swarm.monitor import Monitor

    now = 1_000_000.0
    run = RunConfig("dash", DiLoCoConfig(total_steps=1000, outer_period=20, fragments=2), model_spec("small"), 4,
                    "stdlib")
    monitor = Monitor(None, "dash")
    monitor.run = run
    monitor.records = [
        PeerProgress("a", 90, [4, 4], 100.0, 5000, global_step=100.0, steps_per_s=10.0, time=now - 1.0,
                     loss=2.5, device="cpu (1 threads)", rounds_failed=1, uplink_mbit=12.5),
        PeerProgress("b", 80, [4, 3], 50.0, 3000, global_step=104.0, steps_per_s=10.0, time=now - 0.5,
                     loss=float("nan")),
        PeerProgress("waiting", 0, time=now - 2.0, training=False),
        PeerProgress("left", 50, [2, 2], global_step=60.0, time=now - 1.0, training=False),  # a clean leave
        PeerProgress("stale", 70, [3, 3], global_step=70.0, steps_per_s=10.0, time=now - 11.0),  # gone quiet
    ]
    snap = monitor.snapshot(now)
    assert [p["peer_id"] for p in snap["peers"]] == ["a", "b", "waiting"]
    assert [p["state"] for p in snap["peers"]] == ["training", "training", "joining"]
    assert snap["clock"] == 109.5  # the median of 100 + 10 * 1 and 104 + 10 * 0.5
    assert snap["peers"][1]["loss"] is None and snap["mean_loss"] == 2.5  # (no NaN in JSON)
    # H = 20, offsets 6 and 13: fragment 0's rounds start at 6, 26, ..., 106, 126; fragment 1's at 13, ..., 113
    assert snap["schedule"] == [{"fragment": 0, "rounds": 4, "next_round": 6, "next_round_at": 126},
                                {"fragment": 1, "rounds": 4, "next_round": 5, "next_round_at": 113},
                                {"fragment": 2, "rounds": 0, "next_round": 5, "next_round_at": 120}]
    assert snap["tokens_per_s"] == 150.0 and snap["bytes_sent"] == 8000
    json.dumps(snap, allow_nan=False)


def test_the_agreed_eval_names_the_held_out_data_it_lacks(tmp_path):
    from dataclasses import replace

    from p2p_diloco.core.config import ConfigError
    from p2p_diloco.swarm.agreed_eval import held_out_batches
    from p2p_diloco.swarm.monitor import Monitor

    run = RunConfig("dash", DiLoCoConfig(fragments=2), model_spec("tiny"), 4, "stdlib")
    batches = held_out_batches(run)  # the default data's held-out windows, as every trainer evaluates on
    assert len(batches) == 32 and tuple(batches[0].shape) == (16, 33)
    with pytest.raises(ConfigError, match="is byte-level"):
        held_out_batches(run, tokenizer_dir=str(tmp_path))
    tokenized = replace(run, model=replace(run.model, tokenizer="ab" * 32))
    with pytest.raises(ConfigError, match="give the monitor the same --dataset and --tokenizer"):
        held_out_batches(tokenized)
    monitor = Monitor(None, "dash", eval_every=5.0)
    monitor.run = tokenized
    monitor.prepare_eval()  # refused: said on the page, nothing started, not tried again
    assert "--tokenizer" in monitor.snapshot()["eval_problem"] and monitor.evaluator is None
    assert Monitor(None, "dash").snapshot()["eval_problem"] == "off"
