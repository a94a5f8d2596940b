"""Every decoder that takes bytes from another peer or from disk, as a fuzz target: bytes in, and either a result
or our own error type out — any other exception is a crash. Used by tests/node/test_fuzz.py (hypothesis, short)
and scripts/fuzz.py (hypothesis or atheris, coverage-guided, for minutes).

A target is `(name, function, allowed exception types)`; the function takes one `bytes`.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from types import SimpleNamespace

import click
import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import strategies as st
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.partition import AllreduceException
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import PeerID
from hivemind.utils import MSGPackSerializer

from p2p_diloco.core.codecs import CODECS, CodecError, get_codec
from p2p_diloco.core.config import DiLoCoConfig
from p2p_diloco.emulation.links import LinksError, read_links
from p2p_diloco.node.admission import (Admission, AdmissionError, RunKey, config_subkey, open_run_config,
                                       sign_run_config)
from p2p_diloco.node.checkpoint import CheckpointError, check_checkpoint_dir
from p2p_diloco.node.records import PeerProgress, RecordError, RunConfig
from p2p_diloco.node.seat_ledger import SeatLedger
from p2p_diloco.swarm import seats
from p2p_diloco.swarm.butterfly import read_group
from p2p_diloco.swarm.framing import read_message
from p2p_diloco.swarm.signed_records import SignedRecords
from p2p_diloco.swarm.state_serving import parse_hash_records
from p2p_diloco.task.model import model_spec

PEERS = [PeerID(b"\x00\x24" + bytes([i]) * 36) for i in range(3)]
_scratch = tempfile.mkdtemp(prefix="p2p-diloco-fuzz-")


def _codec(name: str):
    def decode(data: bytes) -> None:
        numel = int.from_bytes(data[:2], "little") if len(data) >= 2 else 0  # the size the receiver expects
        get_codec(name).decode(data[2:], numel)
    return decode


def _hash_records(data: bytes) -> None:
    found = SimpleNamespace(value={"QmPeer": SimpleNamespace(value=data)})
    parse_hash_records(found)  # logs and skips a malformed record: never raises


def _signed_record(data: bytes) -> None:
    record = DHTRecord(b"key-id", msgpack.packb("QmPeer"), data, 1.0)
    checker = SignedRecords()
    assert isinstance(checker.validate(record), bool)
    checker.strip_value(record)


_RUN_KEY = RunKey(Ed25519PrivateKey.from_private_bytes(b"\x07" * 32))


def _token(data: bytes) -> None:
    """A join token as a peer presents it (text), checked as every member checks it."""
    Admission("r", _RUN_KEY.public).problem(data.decode("utf-8", "replace"), "QmPeer")


def _signed_run_config(data: bytes) -> None:
    """A run config record as the DHT returns it; the validator, then the reader."""
    subkey = msgpack.packb(config_subkey(_RUN_KEY.public))
    assert isinstance(SignedRecords().validate(DHTRecord(b"key-id", subkey, data, 1.0)), bool)
    RunConfig.decode(open_run_config(data, _RUN_KEY.public))


def _group_metadata(data: bytes) -> None:
    """What a group's members gathered (their round metadata), the first member's replaced by `data`."""
    honest = MSGPackSerializer.dumps({"run": "r", "fragment": 0, "round": 1, "codec": "fp4", "numel": 100,
                                      "weight": 1.0, "rate": 0.0, "interval": 0.0, "aggregation": "mean"})
    gathered = [data] + [MSGPackSerializer.dumps((1.0, 0, honest)) for _ in PEERS[1:]]
    read_group(GroupInfo(b"g" * 32, tuple(PEERS), tuple(gathered)), PEERS[1], MSGPackSerializer)


def _file(name: str, data: bytes) -> str:
    path = os.path.join(_scratch, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _checkpoint_metadata(data: bytes) -> None:
    directory = os.path.join(_scratch, "checkpoint")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "checkpoint.json"), "wb") as f:
        f.write(data)
    check_checkpoint_dir(directory)


def _profile(data: bytes) -> None:
    from p2p_diloco.cli import join

    ctx = click.Context(join)
    param = next(p for p in join.params if p.name == "profile")
    from p2p_diloco.node.profiles import load_profile

    load_profile(ctx, param, _file("profile.toml", data))


def _links(data: bytes) -> None:
    read_links(_file("links.toml", data), 3)


def _seat_request(data: bytes) -> None:
    """A seat request as the host reads it off a stream (`swarm.seats`): the framed message, then the redeem."""
    async def read() -> object:
        reader = asyncio.StreamReader()
        reader.feed_data(len(data).to_bytes(4, "big") + data)
        reader.feed_eof()
        return await read_message(reader, seats.MAX_MESSAGE, "seat request")
    request = asyncio.run(read())
    token = request.get("token") if isinstance(request, dict) else None
    SeatLedger(os.path.join(_scratch, "fuzz.seats.json")).redeem(_RUN_KEY, "r", token, "QmPeer", now=1.0)


def _seat_ledger(data: bytes) -> None:
    SeatLedger(_file("ledger.seats.json", data))


TARGETS = [
    *[(f"codec_{name}", _codec(name), (CodecError,)) for name in CODECS],
    ("run_config", RunConfig.decode, (RecordError,)),
    ("peer_progress", PeerProgress.decode, (RecordError,)),
    ("hash_records", _hash_records, ()),
    ("signed_record", _signed_record, ()),
    ("group_metadata", _group_metadata, (AllreduceException,)),
    ("token", _token, ()),
    ("signed_run_config", _signed_run_config, (AdmissionError, RecordError)),
    ("checkpoint_metadata", _checkpoint_metadata, (CheckpointError,)),
    ("profile", _profile, (click.BadParameter,)),
    ("links", _links, (LinksError,)),
    ("seat_request", _seat_request, (AdmissionError, ValueError)),
    ("seat_ledger", _seat_ledger, (AdmissionError,)),
]

# inputs each target starts from (atheris mutates them; hypothesis mixes them with random bytes)
SEEDS = {
    "run_config": [RunConfig("r", DiLoCoConfig(fragments=2), model_spec("tiny"), 2, "stdlib").encode()],
    "peer_progress": [PeerProgress("QmPeer", 5, [1, 2], 10.0).encode()],
    "hash_records": [msgpack.packb([4, "a" * 64])],
    "group_metadata": [MSGPackSerializer.dumps((1.0, 0, MSGPackSerializer.dumps({"run": "r", "weight": 2.0})))],
    "signed_record": [msgpack.packb([b"p2p-diloco-signed/1", b"v", b"k" * 294, b"s" * 256])],
    "checkpoint_metadata": [b'{"format": 1, "run_id": "r", "global_step": 5, "inner_step": 5, '
                            b'"state_file": "s.safetensors", "state_sha256": "00"}'],
    "profile": [b'bandwidth = 10\nrun_id = "r"\n'],
    "token": [_RUN_KEY.issue("r", "QmPeer", 3600, now=0.0).encode()],
    "signed_run_config": [sign_run_config(RunConfig("r", DiLoCoConfig(fragments=2), model_spec("tiny"), 2, "stdlib",
                                                    run_key=_RUN_KEY.public.hex()).encode(), _RUN_KEY)],
    "links": [b"[default]\nup_mbit = 10\ndown_mbit = 10\ndelay_ms = 5\n[[peer]]\nup_mbit = 1\n"],
    "seat_request": [msgpack.packb({"token": _RUN_KEY.issue("r", None, 3600, now=0.0, seats=3)})],
    "seat_ledger": [b'{"format": 1, "tokens": {"0a0b": ["QmA", "QmB"]}}'],
}


def inputs(name: str):
    """Random bytes, and the target's valid seeds with bytes flipped, cut or appended."""
    seeds = SEEDS.get(name, [b""])

    @st.composite
    def mutated(draw):
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(0, 4))):
            action = draw(st.sampled_from(["flip", "cut", "add"]))
            if action == "flip" and data:
                i = draw(st.integers(0, len(data) - 1))
                data[i] ^= draw(st.integers(1, 255))
            elif action == "cut" and data:
                del data[draw(st.integers(0, len(data) - 1)):]
            else:
                data += draw(st.binary(max_size=16))
        return bytes(data)

    return st.one_of(st.binary(max_size=512), mutated())


def run_one(target, data: bytes) -> None:
    """Run one input; re-raises anything but the target's own error types."""
    _, function, allowed = target
    try:
        function(data)
    except allowed:
        pass
