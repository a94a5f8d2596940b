"""The model (`task.model`): presets and config files, and its identity in the run config: the hash of its initial
weights, and a peer that cannot reproduce them refusing to train."""

from __future__ import annotations

import json
import subprocess
import sys

import msgpack
import pytest
import torch

from p2p_diloco.core.config import DiLoCoConfig
from p2p_diloco.node.records import RecordError, RunConfig
from p2p_diloco.swarm.dht import publish_run_config, start_dht, visible_maddrs
from p2p_diloco.core.config import ConfigError
from p2p_diloco.task.model import (PRESETS, build_model, built_with, init_sha256, llama_config, model_spec,
                                   parameter_count)

from pretrained import write_pretrained

ROOT = __file__.rsplit("/tests/", 1)[0]
TEXT = open(__file__).read()  # what the tests' tokenizers learn from


def test_the_llama_presets_have_the_sizes_their_names_say():
    for name, size in (("llama-20m", 20e6), ("llama-150m", 150e6), ("llama-1b", 1e9)):
        assert abs(parameter_count(PRESETS[name]) / size - 1) < 0.05, name


def test_a_transformers_llama_config_file_is_a_model_and_what_it_cannot_carry_is_refused(tmp_path):
    assert model_spec(f"{ROOT}/peers/model-llama-20m.json") == PRESETS["llama-20m"]
    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps({"hidden_size": 48, "layers": 3, "heads": 4, "intermediate_size": 96, "seq_len": 64}))
    assert model_spec(str(ours)).layers == 3
    saved = llama_config(PRESETS["tiny"]).to_dict()
    # what the five fields cannot say is carried whole: grouped-query attention, another vocabulary, another norm
    for key, value in (("vocab_size", 32000), ("num_key_value_heads", 1), ("rms_norm_eps", 1e-5)):
        path = tmp_path / f"{key}.json"
        path.write_text(json.dumps({**saved, key: value}))
        spec = model_spec(str(path))
        assert spec.config and json.loads(spec.config)[key] == value and spec.layers == 2, key
        assert RunConfig.decode(RunConfig("r", DiLoCoConfig(fragments=2), spec, 2, "x").encode()).model == spec
    cases = {"model_type": ("nonsense", "not a config transformers can build"),
             "num_hidden_layers": (0, "num_hidden_layers must be a positive integer"),
             "hidden_size": (33, "not a multiple of the 2 attention heads")}
    (tmp_path / "t5.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ConfigError, match="'t5' is not a causal language model"):
        model_spec(str(tmp_path / "t5.json"))
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


def test_any_causal_lm_config_builds_deterministically_and_travels_in_the_run_config(tmp_path):
    from transformers import GPT2Config, Qwen2Config

    GPT2Config(n_embd=32, n_layer=3, n_head=2, n_positions=4096, vocab_size=300).to_json_file(tmp_path / "g.json")
    gpt2 = model_spec(str(tmp_path / "g.json"))
    assert (gpt2.layers, gpt2.hidden_size, gpt2.vocab_size, gpt2.seq_len) == (3, 32, 300, 2048)  # windows capped
    assert type(build_model(gpt2, 0)).__name__ == "GPT2LMHeadModel"
    assert init_sha256(gpt2, 0) == init_sha256(gpt2, 0) != init_sha256(gpt2, 1)
    Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, max_position_embeddings=64).to_json_file(tmp_path / "q.json")
    qwen = model_spec(str(tmp_path / "q.json"))
    assert qwen.describe() == "qwen2" and parameter_count(qwen) > 0
    run = RunConfig("r", DiLoCoConfig(fragments=2), gpt2, 2, "x")
    assert RunConfig.decode(run.encode()) == run
    obj = msgpack.unpackb(run.encode())
    for field, bad, message in (("config", "[1]", "not a JSON object"), ("config", 7, "must be a string"),
                                ("tokenizer", "xyz", "64 hex digits"), ("vocab_size", 0, "positive integer"),
                                ("config", "{" * 13000, "too long")):
        with pytest.raises(RecordError, match=message):
            RunConfig.decode(msgpack.packb({**obj, "model": {**obj["model"], field: bad}}))
    assert "config" not in RunConfig("r", DiLoCoConfig(fragments=2), model_spec("tiny"), 2, "x").model.to_dict()


def test_a_model_directory_with_weights_is_where_every_peer_starts_and_a_different_copy_is_refused(tmp_path):
    from dataclasses import replace

    from p2p_diloco.swarm.peer import _check_reproducible

    model = write_pretrained(tmp_path / "gpt", TEXT)
    spec = model_spec(str(model))
    assert spec.weights == "gpt" and spec.describe() == "gpt2 from gpt" and spec.vocab_size == 400
    loaded = build_model(spec, 123, str(model))  # the seed plays no part: the weights are the directory's
    saved = __import__("safetensors.torch").torch.load_file(str(model / "model.safetensors"))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in saved.items())
    initial = init_sha256(spec, 0, str(model))
    run = RunConfig("pre", DiLoCoConfig(fragments=2), spec, 2, "x", init_sha256=initial)
    _check_reproducible(run, init_sha256(spec, 0, str(model)), str(model))  # the same copy: fine
    with pytest.raises(ConfigError, match="give this peer its own copy of that model directory with --model DIR"):
        build_model(spec, 0)
    other = write_pretrained(tmp_path / "other", TEXT, seed=1)
    with pytest.raises(ConfigError, match="weights of --model .*other.* are not the host's"):
        _check_reproducible(run, init_sha256(spec, 0, str(other)), str(other))
    small = write_pretrained(tmp_path / "small", TEXT, vocab=300)
    with pytest.raises(ConfigError, match="describes another model than the run's"):
        build_model(spec, 0, str(small))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((model / "config.json").read_text())
    (broken / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes()[:100])
    with pytest.raises(ConfigError, match="cannot load its weights"):
        build_model(spec, 0, str(broken))
    assert model_spec(str(tmp_path / "small")).weights == "small"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json in it"):
        model_spec(str(tmp_path / "empty"))
    assert replace(spec, weights="") != spec


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


def test_a_peer_needs_its_copy_of_the_run_s_tokenizer_and_a_dataset_to_read_with_it(tmp_path):
    from dataclasses import replace

    from p2p_diloco.swarm.peer import JoinOptions, _run_tokenizer
    from p2p_diloco.task.tokenizer import HFTokenizer

    model = write_pretrained(tmp_path / "gpt", TEXT)
    other = write_pretrained(tmp_path / "other", TEXT[: len(TEXT) // 3])
    mine = HFTokenizer.load(str(model))
    spec = replace(model_spec(str(model)), tokenizer=mine.sha256)
    run = RunConfig("tok", DiLoCoConfig(fragments=2), spec, 2, "x")
    opts = JoinOptions([], "tok", dataset="somewhere")
    assert _run_tokenizer(run, replace(opts, model_dir=str(model))).sha256 == mine.sha256  # the model dir's own
    assert _run_tokenizer(run, replace(opts, tokenizer_dir=str(model))).sha256 == mine.sha256
    with pytest.raises(ConfigError, match="give this peer its copy with --tokenizer DIR"):
        _run_tokenizer(run, opts)
    with pytest.raises(ConfigError, match="encodes differently from the run's tokenizer"):
        _run_tokenizer(run, replace(opts, tokenizer_dir=str(other)))
    with pytest.raises(ConfigError, match="train on a --dataset"):
        _run_tokenizer(run, replace(opts, tokenizer_dir=str(model), dataset=None))
    byte_run = RunConfig("b", DiLoCoConfig(fragments=2), model_spec("tiny"), 2, "x")
    assert _run_tokenizer(byte_run, replace(opts, model_dir=str(model))) is None
    with pytest.raises(ConfigError, match="is byte-level"):
        _run_tokenizer(byte_run, replace(opts, tokenizer_dir=str(model)))
