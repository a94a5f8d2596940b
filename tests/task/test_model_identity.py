"""The model's identity in the run config: the hash of its initial weights, and a peer that cannot reproduce them
refusing to train."""

from __future__ import annotations

import subprocess
import sys

import msgpack
import pytest

from p2p_diloco.core.config import DiLoCoConfig
from p2p_diloco.node.records import RecordError, RunConfig
from p2p_diloco.swarm.dht import publish_run_config, start_dht, visible_maddrs
from p2p_diloco.task.model import built_with, init_sha256, model_spec


def test_the_initial_weights_hash_is_the_same_every_time_and_differs_by_seed_and_model():
    tiny = model_spec("tiny")
    assert init_sha256(tiny, 0) == init_sha256(tiny, 0)
    assert len({init_sha256(tiny, 0), init_sha256(tiny, 1), init_sha256(model_spec("small"), 0)}) == 3
    assert built_with().startswith("torch ") and "transformers " in built_with()


def test_the_run_config_carries_it_and_refuses_a_malformed_one():
    run = RunConfig("r", DiLoCoConfig(fragments=2), model_spec("tiny"), 2, "stdlib",
                    init_sha256=init_sha256(model_spec("tiny"), 0), built_with=built_with())
    assert RunConfig.decode(run.encode()) == run
    obj = msgpack.unpackb(run.encode())
    for bad in ("abc", "z" * 64, 7):
        with pytest.raises(RecordError, match="init_sha256 must be 64 hex digits"):
            RunConfig.decode(msgpack.packb({**obj, "init_sha256": bad}))
    del obj["init_sha256"], obj["built_with"]  # a host from before: nothing to check
    assert RunConfig.decode(msgpack.packb(obj)).init_sha256 == ""


def test_a_peer_that_would_start_from_other_weights_refuses_the_run_naming_the_versions(tmp_path):
    run = RunConfig("ident", DiLoCoConfig(fragments=2), model_spec("tiny"), 2, "stdlib", init_sha256="ab" * 32,
                    built_with="torch 9.9.9, transformers 99.0")
    dht = start_dht()
    try:
        assert publish_run_config(dht, run)
        cmd = [sys.executable, "-m", "p2p_diloco.cli", "join", "--initial-peers", visible_maddrs(dht)[0],
               "--run-id", "ident", "--steps", "2"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    finally:
        dht.shutdown()
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "cannot reproduce run 'ident'" in proc.stderr and "torch 9.9.9, transformers 99.0" in proc.stderr
    assert "install the host's versions" in proc.stderr
