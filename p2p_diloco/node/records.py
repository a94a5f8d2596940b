"""Records peers publish in the DHT, encoded with msgpack, versioned and validated on read.

A record is a msgpack map with `v` (the protocol version) and `kind`. Reading
checks the version, the kind, every field's type and range; a record that fails
raises `RecordError` naming the field, and callers log it and ignore the record
(a malformed record never crashes a peer).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack

from ..core.config import ConfigError, DiLoCoConfig
from .admission import MAX_TOKEN_CHARS
from ..task.model import MAX_CONFIG_CHARS as MAX_MODEL_CONFIG_CHARS, ModelSpec

PROTOCOL_VERSION = 1
MAX_RECORD_BYTES = 16 * 1024  # DHT values must stay far below hivemind's 64 KiB limit
MAX_DEVICE_CHARS = 80  # a progress record's device description


class RecordError(ValueError):
    """A record from the DHT or a peer is malformed; the message names the problem."""


def _unpack(data: Any, kind: str) -> dict:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RecordError(f"{kind} record: expected bytes, got {type(data).__name__}")
    if len(data) > MAX_RECORD_BYTES:
        raise RecordError(f"{kind} record: {len(data)} bytes, more than the {MAX_RECORD_BYTES} allowed")
    try:
        obj = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several types for garbage
        raise RecordError(f"{kind} record: not valid msgpack ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise RecordError(f"{kind} record: expected a map, got {type(obj).__name__}")
    version = obj.get("v")
    if version != PROTOCOL_VERSION:
        raise RecordError(f"{kind} record: protocol version {version!r}, this peer speaks {PROTOCOL_VERSION}")
    if obj.get("kind") != kind:
        raise RecordError(f"{kind} record: kind is {obj.get('kind')!r}")
    return obj


def _pack(kind: str, body: dict) -> bytes:
    data = msgpack.packb({"v": PROTOCOL_VERSION, "kind": kind, **body}, use_bin_type=True)
    if len(data) > MAX_RECORD_BYTES:
        raise RecordError(f"{kind} record: {len(data)} bytes, more than the {MAX_RECORD_BYTES} allowed")
    return data


def _get(obj: dict, kind: str, name: str, types: type | tuple[type, ...]) -> Any:
    if name not in obj:
        raise RecordError(f"{kind} record: missing field {name!r}")
    value = obj[name]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise RecordError(f"{kind} record: field {name!r} must be {types}, got bool")
    if not isinstance(value, types):
        raise RecordError(f"{kind} record: field {name!r} must be {types}, got {type(value).__name__}")
    return value


def _count(obj: dict, kind: str, name: str) -> int:
    value = _get(obj, kind, name, int)
    if value < 0:
        raise RecordError(f"{kind} record: field {name!r} is negative")
    return value


def _model_spec(spec: dict, kind: str) -> ModelSpec:
    try:
        model = ModelSpec(**spec)
    except TypeError as e:
        raise RecordError(f"{kind} record: bad model spec: {e}") from None
    for name, value in asdict(model).items():
        if name in ("config", "weights", "tokenizer"):
            if not isinstance(value, str):
                raise RecordError(f"{kind} record: model {name} must be a string, got {type(value).__name__}")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RecordError(f"{kind} record: model {name} must be a positive integer, got {value!r}")
    if len(model.config) > MAX_MODEL_CONFIG_CHARS or len(model.weights) > 200:
        raise RecordError(f"{kind} record: model config or weights name too long")
    if model.config:
        try:
            if not isinstance(json.loads(model.config), dict):
                raise ValueError("not an object")
        except ValueError as e:
            raise RecordError(f"{kind} record: model config is not a JSON object ({e})") from None
    if model.tokenizer and (len(model.tokenizer) != 64 or not _is_hex(model.tokenizer)):
        raise RecordError(f"{kind} record: model tokenizer must be 64 hex digits (a sha256) or empty")
    return model


@dataclass(frozen=True)
class RunConfig:
    """What every peer of a run must agree on; published by the host under the run id."""

    run_id: str
    diloco: DiLoCoConfig
    model: ModelSpec
    batch_size: int
    data: str  # a description of the data, for humans; every peer reads its own
    round_timeout: float = 60.0  # seconds a peer waits for a round's group and all-reduce
    target_group_size: int | None = None  # a group forms at once when this many peers are in it
    # seconds a group that is not full waits for more peers; >= 2, since requests to other peers get half of it,
    # at most 1 s, and a new connection cut shorter under load puts that peer in libp2p's dial backoff
    matchmaking_time: float = 3.0
    run_key: str = ""  # hex of the run's Ed25519 public key (`node.admission`); "": the run admits anyone
    # the host's sha256 of the model's initial parameters (`task.model.init_sha256`) and the libraries it used;
    # "": not recorded (a run config of an older host, or built in a test), nothing to check
    init_sha256: str = ""
    built_with: str = ""

    @property
    def admission_only(self) -> bool:
        return bool(self.run_key)

    def encode(self) -> bytes:
        return _pack("run_config", {"run_id": self.run_id, "diloco": self.diloco.to_dict(),
                                    "model": self.model.to_dict(), "batch_size": self.batch_size,
                                    "data": self.data, "round_timeout": self.round_timeout,
                                    "target_group_size": self.target_group_size,
                                    "matchmaking_time": self.matchmaking_time, "run_key": self.run_key,
                                    "init_sha256": self.init_sha256, "built_with": self.built_with})

    @classmethod
    def decode(cls, data: Any) -> "RunConfig":
        kind = "run_config"
        obj = _unpack(data, kind)
        run_id = _get(obj, kind, "run_id", str)
        check_run_id(run_id)
        try:
            diloco = DiLoCoConfig.from_dict(_get(obj, kind, "diloco", dict))
        except ConfigError as e:
            raise RecordError(f"{kind} record: bad diloco config: {e}") from None
        model = _model_spec(_get(obj, kind, "model", dict), kind)
        if diloco.fragments > model.layers:
            raise RecordError(f"{kind} record: fragments={diloco.fragments}, but the model has only {model.layers} "
                              "transformer blocks, so at most that many block fragments")
        batch_size = _count(obj, kind, "batch_size")
        if batch_size < 1:
            raise RecordError(f"{kind} record: batch_size must be >= 1")
        round_timeout = _get(obj, kind, "round_timeout", (int, float))
        if not math.isfinite(round_timeout) or round_timeout <= 0:
            raise RecordError(f"{kind} record: round_timeout must be a positive number")
        target = obj.get("target_group_size")
        if target is not None and (isinstance(target, bool) or not isinstance(target, int) or target < 2):
            raise RecordError(f"{kind} record: target_group_size must be nil or an integer >= 2")
        matchmaking = _get(obj, kind, "matchmaking_time", (int, float))
        if not math.isfinite(matchmaking) or not 2.0 <= matchmaking < round_timeout:
            raise RecordError(f"{kind} record: matchmaking_time must be >= 2 and below round_timeout")
        run_key = obj.get("run_key", "")
        if not isinstance(run_key, str) or run_key and (len(run_key) != 64 or not _is_hex(run_key)):
            raise RecordError(f"{kind} record: run_key must be 64 hex digits (an Ed25519 public key) or empty")
        init = obj.get("init_sha256", "")
        if not isinstance(init, str) or init and (len(init) != 64 or not _is_hex(init)):
            raise RecordError(f"{kind} record: init_sha256 must be 64 hex digits (a sha256) or empty")
        built = obj.get("built_with", "")
        if not isinstance(built, str) or len(built) > 200:
            raise RecordError(f"{kind} record: built_with must be a string of at most 200 characters")
        return cls(run_id, diloco, model, batch_size, _get(obj, kind, "data", str), float(round_timeout), target,
                   float(matchmaking), run_key, init, built)


@dataclass(frozen=True)
class PeerProgress:
    """What a trainer tells the swarm about itself, refreshed every few seconds."""

    peer_id: str
    step: int
    rounds: list[int] = field(default_factory=list)  # rounds applied, per fragment
    tokens_per_s: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    loss: float | None = None
    global_step: float = 0.0  # the swarm clock (swarm/clock.py) as this peer reads it at `time`
    steps_per_s: float = 0.0  # inner steps per second of this peer
    time: float = 0.0  # seconds since the epoch when this record was made
    training: bool = True  # False while the peer waits for the swarm to start
    reachable: bool = True  # False: other machines cannot connect to it (client mode): never a donor of state
    token: str = ""  # its join token (`node.admission`), in a run that admits only token holders
    # for people watching the run (`p2p-diloco monitor`, `host --dashboard`); absent in older peers' records
    device: str = ""  # what it trains on: "cpu", "cuda (NVIDIA H100 80GB HBM3)", ...
    rounds_failed: int = 0  # rounds that failed on this peer, all fragments together
    uplink_mbit: float = 0.0  # its uplink as its transfers measured it (0: nothing measured yet)

    def encode(self) -> bytes:
        return _pack("peer_progress", asdict(self))

    @classmethod
    def decode(cls, data: Any) -> "PeerProgress":
        kind = "peer_progress"
        obj = _unpack(data, kind)
        rounds = _get(obj, kind, "rounds", list)
        if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in rounds):
            raise RecordError(f"{kind} record: rounds must be a list of non-negative integers")
        tps = _get(obj, kind, "tokens_per_s", (int, float))
        if not math.isfinite(tps) or tps < 0:
            raise RecordError(f"{kind} record: tokens_per_s must be a finite number >= 0")
        loss = obj.get("loss")
        if loss is not None and (not isinstance(loss, (int, float)) or isinstance(loss, bool)):
            raise RecordError(f"{kind} record: loss must be a number or nil")
        reachable = obj.get("reachable", True)
        if not isinstance(reachable, bool):
            raise RecordError(f"{kind} record: reachable must be true or false")
        token = obj.get("token", "")
        if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
            raise RecordError(f"{kind} record: token must be a string of at most {MAX_TOKEN_CHARS} characters")
        device = obj.get("device", "")
        if not isinstance(device, str) or len(device) > MAX_DEVICE_CHARS:
            raise RecordError(f"{kind} record: device must be a string of at most {MAX_DEVICE_CHARS} characters")
        numbers = {}
        for name in ("uplink_mbit",):
            value = obj.get(name, 0.0)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
                    or value < 0:
                raise RecordError(f"{kind} record: {name} must be a finite number >= 0")
            numbers[name] = float(value)
        for name in ("global_step", "steps_per_s", "time"):
            value = _get(obj, kind, name, (int, float))
            if not math.isfinite(value) or value < 0:
                raise RecordError(f"{kind} record: {name} must be a finite number >= 0")
            numbers[name] = float(value)
        return cls(_get(obj, kind, "peer_id", str), _count(obj, kind, "step"), list(rounds), float(tps),
                   _count(obj, kind, "bytes_sent"), _count(obj, kind, "bytes_received"),
                   None if loss is None else float(loss), training=_get(obj, kind, "training", bool),
                   reachable=reachable, token=token, device=device,
                   rounds_failed=_count(obj, kind, "rounds_failed") if "rounds_failed" in obj else 0, **numbers)


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def check_run_id(run_id: str) -> str:
    """Run ids namespace DHT keys and averager prefixes: letters, digits, '-' and '_' only."""
    if not run_id or len(run_id) > 64 or not all(c.isalnum() or c in "-_" for c in run_id):
        raise RecordError(f"run id {run_id!r}: use 1-64 letters, digits, '-' or '_'")
    return run_id
