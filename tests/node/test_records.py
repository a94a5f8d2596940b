"""DHT records: msgpack, versioned, validated; anything malformed is refused with the reason."""

import msgpack
import pytest

from p2p_diloco.core.config import DiLoCoConfig
from p2p_diloco.node.records import MAX_RECORD_BYTES, PROTOCOL_VERSION, PeerProgress, RecordError, RunConfig, check_run_id
from p2p_diloco.task.model import model_spec


def run_config() -> RunConfig:
    return RunConfig("run-1", DiLoCoConfig(outer_period=30, codec="int8", fragments=2), model_spec("tiny"), 4, "stdlib",
                     30.0, 3)


def test_run_config_round_trip():
    run = run_config()
    assert RunConfig.decode(run.encode()) == run
    assert len(run.encode()) < 2000


def test_peer_progress_round_trip():
    p = PeerProgress("12D3KooXYZ", 120, [2, 1, 1], 1234.5, 10, 20, 3.2, global_step=118.5, steps_per_s=9.6,
                     time=1.8e9, training=False)
    assert PeerProgress.decode(p.encode()) == p


def _mutate(record: bytes, **changes) -> bytes:
    obj = msgpack.unpackb(record, raw=False)
    for k, v in changes.items():
        if v is KeyError:
            obj.pop(k)
        else:
            obj[k] = v
    return msgpack.packb(obj, use_bin_type=True)


@pytest.mark.parametrize("changes,message", [
    (dict(v=PROTOCOL_VERSION + 1), "protocol version 2, this peer speaks 1"),
    (dict(v=KeyError), "protocol version None"),
    (dict(kind="peer_progress"), "kind is 'peer_progress'"),
    (dict(run_id="a.b"), "run id 'a.b'"),
    (dict(batch_size="4"), "field 'batch_size' must be"),
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(round_timeout=float("nan")), "round_timeout"),
    (dict(matchmaking_time=100.0), "matchmaking_time must be"),
    (dict(model={"hidden_size": 8}), "bad model spec"),
    (dict(diloco={"outer_period": 10, "tau": 9}), "bad diloco config: tau=9"),
    (dict(diloco={"bogus": 1}), "unknown config key"),
    (dict(target_group_size=1), "target_group_size"),
    (dict(data=KeyError), "missing field 'data'"),
])
def test_malformed_run_configs_are_refused(changes, message):
    with pytest.raises(RecordError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RunConfig.decode(_mutate(run_config().encode(), **changes))


@pytest.mark.parametrize("data,message", [
    (b"\xc1\xc1garbage", "not valid msgpack"),
    (msgpack.packb([1, 2]), "expected a map"),
    ("text", "expected bytes"),
    (b"\x00" * (MAX_RECORD_BYTES + 1), "more than the"),
])
def test_garbage_is_refused(data, message):
    with pytest.raises(RecordError, match=message):
        PeerProgress.decode(data)


@pytest.mark.parametrize("changes,message", [
    (dict(step=-1), "'step' is negative"),
    (dict(rounds=[1, -2]), "rounds must be"),
    (dict(rounds="12"), "field 'rounds' must be"),
    (dict(tokens_per_s=float("inf")), "tokens_per_s"),
    (dict(bytes_sent=True), "must be"),
    (dict(loss="low"), "loss must be"),
    (dict(global_step=float("nan")), "global_step must be"),
    (dict(steps_per_s=-1.0), "steps_per_s must be"),
    (dict(time="now"), "field 'time' must be"),
    (dict(training=1), "field 'training' must be"),
])
def test_malformed_progress_is_refused(changes, message):
    good = PeerProgress("peer", 1, [0], 1.0, 0, 0, None).encode()
    with pytest.raises(RecordError, match=message):
        PeerProgress.decode(_mutate(good, **changes))


def test_run_ids():
    assert check_run_id("my_run-2") == "my_run-2"
    for bad in ("", "a b", "x" * 65, "dots.not.allowed"):
        with pytest.raises(RecordError):
            check_run_id(bad)
