"""Checkpoints: a peer restored bit for bit; truncated, changed or mismatched checkpoints refused and left in place."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from p2p_diloco.core.codecs import get_codec
from p2p_diloco.core.config import DiLoCoConfig
from p2p_diloco.core.inner import InnerTrainer
from p2p_diloco.core.local_group import LocalGroup
from p2p_diloco.core.streaming import StreamingDiLoCo
from p2p_diloco.node.checkpoint import META_NAME, CheckpointError, load_checkpoint, save_checkpoint
from p2p_diloco.task.model import build_model, lm_loss, model_spec

SPEC = model_spec("tiny")
CONFIG = DiLoCoConfig(outer_period=6, fragments=2, tau=1, codec="fp4", warmup_steps=2, total_steps=40,
                      error_feedback=True)


MUON = replace(CONFIG, inner_optimizer="muon")


def make_peer(seed: int = 0, config: DiLoCoConfig = CONFIG):
    model = build_model(SPEC, seed)
    trainer = InnerTrainer(model, config, lm_loss)
    outer = StreamingDiLoCo(model, config, LocalGroup(1, get_codec("fp4")).member(0), run_id="r")
    return model, trainer, outer


def train(trainer, outer, steps: range):
    g = torch.Generator().manual_seed(steps.start)
    for t in steps:
        trainer.step(torch.randint(0, 256, (2, SPEC.seq_len + 1), generator=g))
        outer.record_tokens(64)
        outer.sync(t)


def test_a_resumed_peer_continues_exactly_like_the_one_that_saved(tmp_path):
    model, trainer, outer = make_peer()
    train(trainer, outer, range(1, 16))
    assert not outer.in_flight  # rounds in flight are not part of a checkpoint
    save_checkpoint(str(tmp_path), "r", SPEC, outer, trainer, global_step=15)
    train(trainer, outer, range(16, 30))

    model2, trainer2, outer2 = make_peer(seed=7)  # other initial weights: everything must come from the file
    info = load_checkpoint(str(tmp_path), "r", SPEC, outer2, trainer2)
    assert info.global_step == 15 and info.inner_step == 15 and info.rounds == [2, 1, 1]
    train(trainer2, outer2, range(16, 30))
    for a, b in zip(outer.anchors + outer.momenta + outer.residuals, outer2.anchors + outer2.momenta + outer2.residuals):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_saving_again_replaces_the_state_file(tmp_path):
    _, trainer, outer = make_peer()
    save_checkpoint(str(tmp_path), "r", SPEC, outer, trainer, global_step=1)
    assert load_checkpoint(str(tmp_path), "r", SPEC, outer, trainer).data_position is None  # (no --dataset)
    where = {"dataset": "/data/rows", "pass": 1, "row": 17, "offset": 300}  # (`task.dataset` position)
    save_checkpoint(str(tmp_path), "r", SPEC, outer, trainer, global_step=2, data_position=where)
    assert sorted(os.listdir(tmp_path)) == [META_NAME, "state-2.safetensors"]
    assert load_checkpoint(str(tmp_path), "r", SPEC, outer, trainer).data_position == where


def corrupt_truncate(d):
    path = d / "state-5.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def corrupt_flip(d):
    path = d / "state-5.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))


def corrupt_meta(d):
    (d / META_NAME).write_text("{not json")


def corrupt_missing(d):
    os.remove(d / "state-5.safetensors")


@pytest.mark.parametrize("corrupt,message", [
    (corrupt_truncate, "does not match the recorded"),
    (corrupt_flip, "does not match the recorded"),
    (corrupt_meta, "unreadable"),
    (corrupt_missing, "missing"),
])
def test_a_damaged_checkpoint_is_refused_and_left_in_place(tmp_path, corrupt, message):
    _, trainer, outer = make_peer()
    train(trainer, outer, range(1, 6))
    save_checkpoint(str(tmp_path), "r", SPEC, outer, trainer, global_step=5)
    corrupt(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    _, trainer2, outer2 = make_peer(seed=3)
    anchors = [a.clone() for a in outer2.anchors]
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(str(tmp_path), "r", SPEC, outer2, trainer2)
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing on disk touched
    assert all(torch.equal(a, b) for a, b in zip(anchors, outer2.anchors))  # nor the peer


def test_a_checkpoint_of_another_run_or_model_is_refused(tmp_path):
    _, trainer, outer = make_peer()
    save_checkpoint(str(tmp_path), "r", SPEC, outer, trainer, global_step=1)
    _, trainer2, outer2 = make_peer()
    with pytest.raises(CheckpointError, match="a checkpoint of run 'r', not 'other'"):
        load_checkpoint(str(tmp_path), "other", SPEC, outer2, trainer2)
    with pytest.raises(CheckpointError, match="model"):
        load_checkpoint(str(tmp_path), "r", model_spec("small"), outer2, trainer2)
    meta = json.loads((tmp_path / META_NAME).read_text())
    meta["digests"][0] = "0" * 64
    (tmp_path / META_NAME).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not match their recorded hash"):
        load_checkpoint(str(tmp_path), "r", SPEC, outer2, trainer2)


def test_a_crash_while_saving_leaves_the_previous_checkpoint_whole(tmp_path):
    _, trainer, outer = make_peer()
    save_checkpoint(str(tmp_path), "r", SPEC, outer, trainer, global_step=3)
    (tmp_path / "state-9.safetensors.tmp123").write_bytes(b"half a file")  # the new state, interrupted
    _, trainer2, outer2 = make_peer(seed=5)
    assert load_checkpoint(str(tmp_path), "r", SPEC, outer2, trainer2).global_step == 3
    with pytest.raises(CheckpointError, match="no checkpoint here"):
        load_checkpoint(str(tmp_path / "nowhere"), "r", SPEC, outer2, trainer2)


def muon_buffers(trainer) -> dict[int, torch.Tensor]:
    """Muon's momentum buffers by parameter position (as the checkpoint names them), cloned."""
    position = {id(p): i for i, p in enumerate(trainer.model.parameters())}
    return {position[id(p)]: trainer.muon.state[p]["momentum_buffer"].clone()
            for g in trainer.muon.param_groups for p in g["params"] if p in trainer.muon.state}


def test_a_resumed_muon_peer_restores_its_momentum_buffers_and_continues_exactly(tmp_path):
    model, trainer, outer = make_peer(config=MUON)
    train(trainer, outer, range(1, 10))
    saved_buffers = muon_buffers(trainer)
    saved_state = {i: {k: v.clone() for k, v in s.items()} for i, s in trainer.optimizer.state_dict()["state"].items()}
    assert len(saved_buffers) == 14  # the tiny model's 2 blocks x 7 matrices
    save_checkpoint(str(tmp_path), "r", SPEC, outer, trainer, global_step=9)
    meta = json.loads((tmp_path / META_NAME).read_text())
    assert sorted(meta["muon_param_groups"][0]["params"]) == sorted(saved_buffers)
    tensors = load_file(str(tmp_path / "state-9.safetensors"))
    assert sorted(int(k.split("/")[1]) for k in tensors if k.startswith("muon/")) == sorted(saved_buffers)
    assert not any(k.startswith(f"adam/{i}/") for i in saved_buffers for k in tensors)  # Muon's are not AdamW's
    train(trainer, outer, range(10, 14))

    model2, trainer2, outer2 = make_peer(seed=7, config=MUON)
    assert load_checkpoint(str(tmp_path), "r", SPEC, outer2, trainer2).inner_step == 9
    restored = muon_buffers(trainer2)
    assert restored.keys() == saved_buffers.keys()
    assert all(torch.equal(restored[i], b) for i, b in saved_buffers.items())  # bit for bit
    state2 = trainer2.optimizer.state_dict()["state"]
    for i, s in saved_state.items():
        if "exp_avg" in s:
            assert all(torch.equal(state2[i][k], s[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    train(trainer2, outer2, range(10, 14))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert all(torch.equal(a, b) for a, b in zip(outer.anchors + outer.momenta, outer2.anchors + outer2.momenta))
    assert all(torch.equal(b, muon_buffers(trainer)[i]) for i, b in muon_buffers(trainer2).items())


def test_a_muon_checkpoint_saved_before_any_step_resumes_like_a_fresh_peer(tmp_path):
    model, trainer, outer = make_peer(config=MUON)
    save_checkpoint(str(tmp_path), "r", SPEC, outer, trainer, global_step=0)  # Muon has no buffers yet: zeros
    model2, trainer2, outer2 = make_peer(seed=4, config=MUON)
    load_checkpoint(str(tmp_path), "r", SPEC, outer2, trainer2)
    assert all(not b.any() for b in muon_buffers(trainer2).values())
    train(trainer, outer, range(1, 4))
    train(trainer2, outer2, range(1, 4))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))


def _rewrite_state(directory, change) -> None:
    """Change the state file's tensors and record its new hash: a checkpoint whose writer got it wrong (the
    file whole, its contents not what the run needs)."""
    meta = json.loads((directory / META_NAME).read_text())
    path = directory / meta["state_file"]
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))
    meta["state_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (directory / META_NAME).write_text(json.dumps(meta))


def _first_muon(tensors) -> str:
    return min((k for k in tensors if k.startswith("muon/")), key=lambda k: int(k.split("/")[1]))


def drop_buffer(tensors):
    del tensors[_first_muon(tensors)]


def transpose_buffer(tensors):
    name = next(k for k in tensors if k.startswith("muon/") and tensors[k].shape[0] != tensors[k].shape[1])
    tensors[name] = tensors[name].t().contiguous()


def nan_buffer(tensors):
    tensors[_first_muon(tensors)][0, 0] = float("nan")


def half_buffer(tensors):
    tensors[_first_muon(tensors)] = tensors[_first_muon(tensors)].half()


@pytest.mark.parametrize("damage,message", [
    (drop_buffer, r"no tensor 'muon/\d+/momentum_buffer'"),
    (transpose_buffer, r"muon/\d+/momentum_buffer is \(\d+, \d+\) torch.float32, expected"),
    (nan_buffer, r"muon/\d+/momentum_buffer holds non-finite values"),
    (half_buffer, r"muon/\d+/momentum_buffer is \(\d+, \d+\) torch.float16, expected \(\d+, \d+\) "
                  r"torch.float32"),
], ids=["missing", "transposed", "nan", "fp16"])
def test_a_muon_checkpoint_with_a_missing_or_bad_momentum_buffer_is_refused_and_nothing_changes(tmp_path, damage,
                                                                                                message):
    _, trainer, outer = make_peer(config=MUON)
    train(trainer, outer, range(1, 6))
    save_checkpoint(str(tmp_path), "r", SPEC, outer, trainer, global_step=5)
    _rewrite_state(tmp_path, damage)
    on_disk = {p: p.read_bytes() for p in tmp_path.iterdir()}
    model2, trainer2, outer2 = make_peer(seed=3, config=MUON)
    train(trainer2, outer2, range(1, 3))  # a peer with state of its own, which must survive the refusal
    params = [p.detach().clone() for p in model2.parameters()]
    anchors, buffers = [a.clone() for a in outer2.anchors], muon_buffers(trainer2)
    adam = {i: s["exp_avg"].clone() for i, s in trainer2.optimizer.state_dict()["state"].items() if "exp_avg" in s}
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(str(tmp_path), "r", SPEC, outer2, trainer2)
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == on_disk
    assert all(torch.equal(p, q) for p, q in zip(params, model2.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(anchors, outer2.anchors))
    after = muon_buffers(trainer2)
    assert after.keys() == buffers.keys() and all(torch.equal(after[i], b) for i, b in buffers.items())
    state = trainer2.optimizer.state_dict()["state"]
    assert all(torch.equal(state[i]["exp_avg"], m) for i, m in adam.items()) and trainer2.step_count == 2


def test_a_checkpoint_of_the_other_inner_optimizer_or_other_muon_parameters_is_refused(tmp_path):
    _, trainer, outer = make_peer()
    save_checkpoint(str(tmp_path / "adamw"), "r", SPEC, outer, trainer, global_step=1)
    _, muon_trainer, muon_outer = make_peer(config=MUON)
    save_checkpoint(str(tmp_path / "muon"), "r", SPEC, muon_outer, muon_trainer, global_step=1)

    def resume(directory, config):
        _, trainer2, outer2 = make_peer(seed=2, config=config)
        return load_checkpoint(str(tmp_path / directory), "r", SPEC, outer2, trainer2)

    with pytest.raises(CheckpointError, match="saved with inner_optimizer adamw, the run has muon"):
        resume("adamw", MUON)
    with pytest.raises(CheckpointError, match="saved with inner_optimizer muon, the run has adamw"):
        resume("muon", CONFIG)
    meta = json.loads((tmp_path / "muon" / META_NAME).read_text())
    meta["muon_param_groups"][0]["params"] = meta["muon_param_groups"][0]["params"][1:]  # one matrix fewer
    (tmp_path / "muon" / META_NAME).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="muon_param_groups do not name the parameters this run trains with"):
        resume("muon", MUON)
    meta["diloco"]["inner_optimizer"] = "adamw"  # a Muon checkpoint that says it is not one
    (tmp_path / "muon" / META_NAME).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="muon_param_groups do not name the parameters"):
        resume("muon", CONFIG)
