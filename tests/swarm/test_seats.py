"""Limited open tokens (`admit --seats N`): the host's seat ledger (`node.seat_ledger`), redeeming a seat over
libp2p (`swarm.seats`), and a trainer that joins with such a token (`join`)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from p2p_diloco.core.config import DiLoCoConfig
from p2p_diloco.node.admission import Admission, AdmissionError, RunKey, Token, sign_run_config
from p2p_diloco.node.records import RunConfig
from p2p_diloco.node.seat_ledger import SeatLedger, ledger_path
from p2p_diloco.swarm import seats
from p2p_diloco.swarm.dht import create_identity, identity_peer_id, publish_run_config, visible_maddrs
from p2p_diloco.task.model import model_spec


@pytest.fixture
def key_path(tmp_path):
    path = str(tmp_path / "run.key")
    RunKey.load_or_create(path)
    return path


def test_a_limited_token_admits_nobody_until_redeemed_and_only_as_many_as_its_seats(key_path):
    key = RunKey.load(key_path)
    now = time.time()
    limited = key.issue("pub", None, 3600, now=now, seats=2)
    token = Token.parse(limited)
    assert token.seats == 2 and token.peer == "" and "up to 2 identities" in token.describe()
    assert "redeemed at the host" in Admission("pub", key.public).problem(limited, "QmA", now)
    ledger = SeatLedger(ledger_path(key_path))
    a = ledger.redeem(key, "pub", limited, "QmA", now)
    b = ledger.redeem(key, "pub", limited, "QmB", now)
    admission = Admission("pub", key.public)
    assert admission.problem(a, "QmA", now) is None and admission.problem(b, "QmB", now) is None
    assert "not QmB" in admission.problem(a, "QmB", now)
    assert Token.parse(a).expires == pytest.approx(token.expires)  # no longer than the token it came from
    with pytest.raises(AdmissionError, match="all 2 seats of this token are taken"):
        ledger.redeem(key, "pub", limited, "QmC", now)
    # a holder asks again (a restart with the same identity): its seat, not another
    assert admission.problem(ledger.redeem(key, "pub", limited, "QmA", now), "QmA", now) is None
    # the ledger outlives the host: a new one read from the file refuses the third identity as well
    again = SeatLedger(ledger_path(key_path))
    with pytest.raises(AdmissionError, match="all 2 seats"):
        again.redeem(key, "pub", limited, "QmC", now)
    assert again.taken == {token.token_id.hex(): ["QmA", "QmB"]}
    # what cannot be redeemed, and why
    with pytest.raises(AdmissionError, match="without seats"):
        again.redeem(key, "pub", key.issue("pub", None, 60, now=now), "QmC", now)
    with pytest.raises(AdmissionError, match="expired"):
        again.redeem(key, "pub", limited, "QmC", now + 3601)
    with pytest.raises(AdmissionError, match="for run 'pub', not 'other'"):
        again.redeem(key, "other", limited, "QmC", now)
    with pytest.raises(AdmissionError, match="not a join token"):
        again.redeem(key, "pub", "hello", "QmC", now)
    with pytest.raises(AdmissionError, match="one peer id has one seat"):
        key.issue("pub", "QmA", 60, seats=3)
    with pytest.raises(AdmissionError, match="whole number"):
        key.issue("pub", None, 60, seats=-1)


def test_a_damaged_ledger_is_refused_naming_it_and_left_as_it_is(key_path):
    path = ledger_path(key_path)
    for junk in (b"{not json", b'{"format": 1, "tokens": {"zz": ["QmA"]}}',
                 b'{"format": 1, "tokens": {"ab": "QmA"}}', b'{"format": 2, "tokens": {}}'):
        with open(path, "wb") as f:
            f.write(junk)
        with pytest.raises(AdmissionError, match=f"seat ledger {path} is damaged"):
            SeatLedger(path)
        with open(path, "rb") as f:
            assert f.read() == junk


def test_seats_are_redeemed_at_the_host_over_libp2p_for_the_asking_identity_only(key_path, dhts, tmp_path):
    key = RunKey.load(key_path)
    limited = key.issue("pub", None, 3600, seats=2)
    host, = dhts(1, run_id="pub", admission_only=True)
    seats.serve(host, key_path, "pub", ledger_path(key_path))
    a, b, c = dhts(3, initial_peers=visible_maddrs(host), run_id="pub", admission_only=True)
    initial = visible_maddrs(host)
    admission = Admission("pub", key.public)
    mine = {d: seats.redeem(d, initial, limited) for d in (a, b)}
    assert all(admission.problem(t, str(d.peer_id)) is None for d, t in mine.items())
    with pytest.raises(AdmissionError, match="all 2 seats of this token are taken"):
        seats.redeem(c, initial, limited)
    assert admission.problem(seats.redeem(a, initial, limited), str(a.peer_id)) is None  # its own seat again
    # only the host can redeem: a trainer named as the initial peer has no seat service
    with pytest.raises(AdmissionError, match="--initial-peers must name the host"):
        seats.redeem(c, visible_maddrs(a), limited)
    # a host restarted on the same ledger still counts the seats taken
    host.shutdown()
    host2, = dhts(1, run_id="pub", admission_only=True)
    seats.serve(host2, key_path, "pub", ledger_path(key_path))
    d, = dhts(1, initial_peers=visible_maddrs(host2), run_id="pub", admission_only=True)
    with pytest.raises(AdmissionError, match="all 2 seats"):
        seats.redeem(d, visible_maddrs(host2), limited)
    with open(ledger_path(key_path)) as f:
        assert json.load(f)["tokens"] == {Token.parse(limited).token_id.hex(): [str(a.peer_id), str(b.peer_id)]}


def test_join_redeems_a_limited_token_and_a_trainer_past_the_seats_is_refused(key_path, dhts, tmp_path):
    """The CLI end to end: `join --token` with a one-seat token trains; a second identity exits 1 naming why."""
    key = RunKey.load(key_path)
    run = RunConfig("pub", DiLoCoConfig(fragments=2, outer_period=10), model_spec("tiny"), 2, "stdlib",
                    run_key=key.public.hex())
    host, = dhts(1, run_id="pub", admission_only=True)
    seats.serve(host, key_path, "pub", ledger_path(key_path))
    assert publish_run_config(host, run, signed=sign_run_config(run.encode(), key))
    limited = key.issue("pub", None, 3600, seats=1)
    results = []
    for name in ("first", "second"):
        identity = str(tmp_path / f"{name}.key")
        create_identity(identity)
        cmd = [sys.executable, "-m", "p2p_diloco.cli", "join", "--initial-peers", visible_maddrs(host)[0],
               "--run-id", "pub", "--token", limited, "--identity", identity, "--steps", "3",
               "--summary", str(tmp_path / f"{name}.json")]
        results.append((identity, subprocess.run(cmd, capture_output=True, text=True, timeout=180)))
    (first_id, first), (_, second) = results
    assert first.returncode == 0, first.stderr[-3000:]
    assert "took a seat of the token" in first.stderr
    redeemed = first.stderr.split("next time, or redeem the same seat again with that identity): ")[1].split()[0]
    assert Admission("pub", key.public).problem(redeemed, str(identity_peer_id(first_id))) is None
    assert second.returncode == 1 and "all 1 seats of this token are taken" in second.stderr, second.stderr[-3000:]
    with open(ledger_path(key_path)) as f:
        assert json.load(f)["tokens"] == {Token.parse(limited).token_id.hex(): [str(identity_peer_id(first_id))]}
