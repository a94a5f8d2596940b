"""The model (`task.model`): presets and config files, and its identity in the run config: the hash of its initial
weights, and a peer that cannot reproduce them refusing to train."""

from __future__ import annotations

import json
import subprocess
import sys

import msgpack
import pytest

from p2p_diloco.core.config import DiLoCoConfig
from p2p_diloco.node.records import RecordError, RunConfig
from p2p_diloco.swarm.dht import publish_run_config, start_dht, visible_maddrs
from p2p_diloco.core.config import ConfigError
from p2p_diloco.task.model import PRESETS, built_with, init_sha256, llama_config, model_spec, parameter_count

ROOT = __file__.rsplit("/tests/", 1)[0]


def test_the_llama_presets_have_the_sizes_their_names_say():
    for name, size in (("llama-20m", 20e6), ("llama-150m", 150e6), ("llama-1b", 1e9)):
        assert abs(parameter_count(PRESETS[name]) / size - 1) < 0.05, name


def test_a_transformers_llama_config_file_is_a_model_and_what_it_cannot_carry_is_refused(tmp_path):
    assert model_spec(f"{ROOT}/peers/model-llama-20m.json") == PRESETS["llama-20m"]
    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps({"hidden_size": 48, "layers": 3, "heads": 4, "intermediate_size": 96, "seq_len": 64}))
    assert model_spec(str(ours)).layers == 3
    saved = llama_config(PRESETS["tiny"]).to_dict()
    cases = {"model_type": ("gpt2", "only Llama-family"), "vocab_size": (32000, "byte-level"),
             "num_key_value_heads": (1, "grouped-query"), "rms_norm_eps": (1e-5, "rms_norm_eps = 1e-05"),
             "num_hidden_layers": (0, "num_hidden_layers must be a positive integer"),
             "hidden_size": (33, "not a multiple of the 2 attention heads")}
    for key, (value, message) in cases.items():
        path = tmp_path / f"{key}.json"
        path.write_text(json.dumps({**saved, key: value}))
        with pytest.raises(ConfigError, match=message):
            model_spec(str(path))
    (tmp_path / "junk.json").write_text("{oops")
    with pytest.raises(ConfigError, match="junk.json: not a model config"):
        model_spec(str(tmp_path / "junk.json"))
    with pytest.raises(ConfigError, match="cannot read it"):
        model_spec(str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="unknown preset.*llama-1b"):
        model_spec("huge")


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
