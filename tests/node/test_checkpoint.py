"""Checkpoints: a peer restored bit for bit; truncated, changed or mismatched checkpoints refused and left in place."""

from __future__ import annotations

import json
import os

import pytest
import torch

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


def make_peer(seed: int = 0):
    model = build_model(SPEC, seed)
    trainer = InnerTrainer(model, CONFIG, lm_loss)
    outer = StreamingDiLoCo(model, CONFIG, LocalGroup(1, get_codec("fp4")).member(0), run_id="r")
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
