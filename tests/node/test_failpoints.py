"""Failpoints: parsing, refusal of bad specs, and the crash itself (the whole process group goes)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from p2p_diloco.node import failpoints
from p2p_diloco.cli import main
from p2p_diloco.node.failpoints import ENV, FailpointError, parse


def test_specs_parse_to_a_point_and_a_hit():
    assert parse(None) is None and parse("") is None
    assert parse("sending") == ("sending", 1)
    assert parse("reducing:7") == ("reducing", 7)


@pytest.mark.parametrize("spec, problem", [
    ("sendin", "unknown failpoint 'sendin'"),
    ("sending:0", "whole number >= 1"),
    ("sending:-2", "whole number >= 1"),
    ("sending:x", "whole number >= 1"),
    ("sending:", None),  # an empty count is the default, hit 1
])
def test_bad_specs_are_refused_by_name(spec, problem):
    if problem is None:
        assert parse(spec) == ("sending", 1)
        return
    with pytest.raises(FailpointError, match=problem):
        parse(spec)


def test_join_refuses_a_bad_failpoint_before_it_starts(monkeypatch):
    monkeypatch.setenv(ENV, "nowhere:2")
    result = CliRunner().invoke(main, ["join", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/x"])
    assert result.exit_code == 2
    assert "unknown failpoint 'nowhere'" in result.output


def test_an_unarmed_or_other_point_does_nothing(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert failpoints.reached("sending") is False
    monkeypatch.setenv(ENV, "reducing")
    assert failpoints.reached("sending") is False


def test_an_error_point_fails_its_armed_hit_and_the_process_stays_up(monkeypatch):
    monkeypatch.setattr(failpoints, "_hits", {})
    monkeypatch.setenv(ENV, "dropping_out:2")
    assert [failpoints.reached("dropping_out") for _ in range(4)] == [False, True, False, False]


def test_the_armed_hit_kills_the_whole_process_group(tmp_path):
    """The third hit kills the process and a child of it (as it would kill a peer's averagers and p2pd)."""
    marker = tmp_path / "child.pid"
    code = f"""
import subprocess, sys, time
from p2p_diloco.node import failpoints
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
open({str(marker)!r}, "w").write(str(child.pid))
for i in range(5):
    print("hit", i + 1, flush=True)
    failpoints.reached("serving_state")
print("survived", flush=True)
"""
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, ENV: "serving_state:3"},
                          capture_output=True, text=True, timeout=60, start_new_session=True)
    assert proc.returncode == -9
    assert proc.stdout.split() == ["hit", "1", "hit", "2", "hit", "3"]
    assert "failpoint serving_state (hit 3)" in proc.stderr
    assert _gone(int(marker.read_text()))


def _gone(pid: int, timeout: float = 10) -> bool:
    """True once `pid` has exited (gone, or a zombie waiting for init to reap it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False
