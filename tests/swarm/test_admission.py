"""Admission (`node.admission`): run keys, join tokens, the run config signed by the run key; and the DHT's side:
an admission-only run's config cannot be replaced, and no plain value can be stored over a run's peer records."""

from __future__ import annotations

import logging
import os
import stat
import time

import hivemind
import msgpack
import pytest
import torch
from hivemind.utils import get_dht_time

from p2p_diloco.core.averaging import RoundKey
from p2p_diloco.core.config import DiLoCoConfig
from p2p_diloco.core.state_hash import state_hash
from p2p_diloco.node.admission import (TOKEN_PREFIX, Admission, AdmissionError, RunKey, Token, config_subkey,
                                       open_run_config, sign_run_config)
from p2p_diloco.node.records import PeerProgress, RunConfig
from p2p_diloco.swarm.averager import SwarmAverager
from p2p_diloco.swarm.dht import fetch_progress, fetch_run_config, publish_progress, publish_run_config, visible_maddrs
from p2p_diloco.task.model import model_spec


def _run(key: RunKey, run_id: str = "pub") -> RunConfig:
    return RunConfig(run_id, DiLoCoConfig(fragments=2), model_spec("tiny"), 2, "stdlib", run_key=key.public.hex())


def test_a_run_key_is_created_once_private_and_loaded_after(tmp_path):
    path = str(tmp_path / "run.key")
    key, created = RunKey.load_or_create(path)
    assert created and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again, created = RunKey.load_or_create(path)
    assert not created and again.public == key.public
    (tmp_path / "junk.key").write_bytes(b"not a key")
    with pytest.raises(AdmissionError, match="junk.key: not a PEM private key"):
        RunKey.load(str(tmp_path / "junk.key"))


def test_a_token_admits_its_peer_in_its_run_until_it_expires(tmp_path):
    key = RunKey.load_or_create(str(tmp_path / "k"))[0]
    now = time.time()
    admission = Admission("pub", key.public)
    mine = key.issue("pub", "QmMe", 3600, now=now)
    assert mine.startswith(TOKEN_PREFIX) and len(mine) < 400
    assert admission.problem(mine, "QmMe", now) is None
    assert "a token for peer QmMe, not QmYou" in admission.problem(mine, "QmYou", now)
    assert "expired" in admission.problem(mine, "QmMe", now + 3601)
    anyone = key.issue("pub", None, 60, now=now)
    assert admission.problem(anyone, "QmYou", now) is None and admission.problem(anyone, "QmMe", now) is None
    assert "for run 'pub', not 'other'" in Admission("other", key.public).problem(anyone, "QmMe", now)
    other_key = RunKey.load_or_create(str(tmp_path / "k2"))[0]
    assert "another run key" in Admission("pub", other_key.public).problem(anyone, "QmMe", now)
    assert Token.parse(mine).describe().startswith("run 'pub', peer QmMe, valid until")


def test_a_forged_altered_or_damaged_token_is_refused_naming_why(tmp_path):
    key = RunKey.load_or_create(str(tmp_path / "k"))[0]
    admission = Admission("pub", key.public)
    token = key.issue("pub", "QmMe", 3600)
    assert admission.problem(None, "QmMe") == "no token" and admission.problem(7, "QmMe") == "no token"
    assert "not a join token" in admission.problem("hello", "QmMe")
    assert "damaged" in admission.problem(token[:-20], "QmMe")
    assert "characters" in admission.problem(TOKEN_PREFIX + "A" * 5000, "QmMe")
    # the same body re-signed by another key (a forger's), claiming this run's key: the signature fails
    forger = RunKey.load_or_create(str(tmp_path / "forger"))[0]
    import base64
    packed, _ = msgpack.unpackb(base64.urlsafe_b64decode(token[len(TOKEN_PREFIX):] + "=="), raw=True)
    body = msgpack.unpackb(packed, raw=False)
    body[2] = "QmForger"  # altered: another peer id
    altered = msgpack.packb(body, use_bin_type=True)
    forged = TOKEN_PREFIX + base64.urlsafe_b64encode(
        msgpack.packb([altered, forger.sign(b"p2p-diloco-token/1" + altered)])).decode().rstrip("=")
    assert "signature does not match" in admission.problem(forged, "QmForger")


def test_the_run_config_is_signed_by_the_run_key(tmp_path):
    key = RunKey.load_or_create(str(tmp_path / "k"))[0]
    run = _run(key)
    signed = sign_run_config(run.encode(), key)
    assert RunConfig.decode(open_run_config(signed, key.public)) == run
    other = RunKey.load_or_create(str(tmp_path / "k2"))[0]
    with pytest.raises(AdmissionError, match="not signed by the run key"):
        open_run_config(sign_run_config(run.encode(), other), key.public)
    with pytest.raises(AdmissionError, match="not a signed config"):
        open_run_config(run.encode(), key.public)


def test_an_admission_only_run_config_cannot_be_replaced_and_needs_a_token_to_read(tmp_path, dhts):
    key = RunKey.load_or_create(str(tmp_path / "k"))[0]
    run = _run(key)
    host, = dhts(1, run_id="pub", admission_only=True)
    reader, = dhts(1, run_id="pub", admission_only=True, initial_peers=visible_maddrs(host))
    assert publish_run_config(host, run, signed=sign_run_config(run.encode(), key))
    assert fetch_run_config(reader, "pub", timeout=10, run_key=key.public) == run
    with pytest.raises(AdmissionError, match="admits only peers with a join token"):
        fetch_run_config(reader, "pub", timeout=1)
    # a stranger (a stock hivemind node) stores a plain config over it, and one under the key's subkey that the
    # key did not sign, both with a far later expiration: our nodes refuse both, the signed config stands
    stranger = hivemind.DHT(start=True, initial_peers=visible_maddrs(host), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        forged = RunConfig("pub", DiLoCoConfig(fragments=1), model_spec("tiny"), 99, "forged", run_key=key.public.hex())
        later = get_dht_time() + 3000
        stranger.store("pub_config", forged.encode(), expiration_time=later)
        stranger.store("pub_config", forged.encode(), expiration_time=later, subkey=config_subkey(key.public))
        time.sleep(1.5)
        assert fetch_run_config(reader, "pub", timeout=10, run_key=key.public) == run
        # nor can it wipe the run's progress records with a plain value
        publish_progress(host, "pub", PeerProgress(str(host.peer_id), 5))
        time.sleep(1.0)
        stranger.store("pub_progress", b"wiped", expiration_time=later)
        time.sleep(1.5)
        assert [p.step for p in fetch_progress(reader, "pub")] == [5]
    finally:
        stranger.shutdown()


def test_a_donor_serves_its_state_to_admitted_peers_only(tmp_path, dhts, caplog):
    """Real averager processes in an admission-only run: the donor hands its state to a peer whose progress record
    carries a token for it, and nothing to one that presents a token stolen from another peer."""
    key = RunKey.load_or_create(str(tmp_path / "k"))[0]
    admission = Admission("pub", key.public)
    a, b, c = dhts(3, run_id="pub", admission_only=True)
    tokens = {d: key.issue("pub", str(d.peer_id), 3600) for d in (a, b)}
    tokens[c] = tokens[a]  # stolen
    avs = [SwarmAverager(d, "pub", [3000], "fp4", round_timeout=10, admission=admission, token=tokens[d])
           for d in (a, b, c)]
    try:
        for d in (a, b, c):
            publish_progress(d, "pub", PeerProgress(str(d.peer_id), 0, token=tokens[d]))
        round_key = RoundKey("pub", 0, 4)
        anchor, momentum = torch.randn(3000), torch.randn(3000)
        digest = state_hash(anchor, momentum)
        avs[0].applied(round_key, anchor, momentum, digest)
        for av in avs[1:]:
            av.live_peers = {avs[0].peer_id}
        time.sleep(1.0)
        state = avs[1].recover(round_key, digest)
        assert state is not None and torch.equal(state.anchor, anchor)
        with caplog.at_level(logging.WARNING):
            assert avs[2].recover(round_key, digest) is None
        assert "the donor has no state for this fragment" in caplog.text
    finally:
        for av in avs:
            av.shutdown()
