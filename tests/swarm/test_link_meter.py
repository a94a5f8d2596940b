"""The link meter: peaks of this machine's interface counters, loopback left out, decaying."""

from __future__ import annotations

import time

from p2p_diloco.swarm.link_meter import MIN_BYTES, LinkMeter, read_counters


def _interface(root, name: str, tx: int, rx: int) -> None:
    stats = root / name / "statistics"
    stats.mkdir(parents=True, exist_ok=True)
    (stats / "tx_bytes").write_text(f"{tx}\n")
    (stats / "rx_bytes").write_text(f"{rx}\n")


def test_counters_sum_every_interface_but_loopback(tmp_path):
    _interface(tmp_path, "lo", 10**9, 10**9)
    assert read_counters(str(tmp_path)) is None  # only loopback: no link to measure
    _interface(tmp_path, "eth0", 100, 200)
    _interface(tmp_path, "eth1", 1, 2)
    (tmp_path / "broken").mkdir()  # an interface without counters is skipped
    assert read_counters(str(tmp_path)) == (101, 202)
    assert read_counters(str(tmp_path / "missing")) is None


def test_the_peak_rate_is_kept_idle_samples_ignored_and_it_decays():
    meter = LinkMeter(half_life_s=3600)
    assert meter.up == 0.0 and meter.down == 0.0  # unmeasured
    meter.observe(2 * MIN_BYTES, MIN_BYTES // 2, 1.0)
    assert abs(meter.up - 2 * MIN_BYTES) < 1 and meter.down == 0.0  # too little received to tell
    meter.observe(MIN_BYTES, 4 * MIN_BYTES, 2.0)  # slower up: the peak stays; down measured
    assert abs(meter.up - 2 * MIN_BYTES) < 1 and abs(meter.down - 2 * MIN_BYTES) < 1
    meter.observe(10, 10, 1.0)  # idle between rounds: no information
    assert abs(meter.up - 2 * MIN_BYTES) < 1
    fast = LinkMeter(half_life_s=0.05)
    fast.observe(8 * MIN_BYTES, 0, 1.0)
    time.sleep(0.2)  # four half-lives
    assert fast.up < 8 * MIN_BYTES / 8


def test_the_meter_samples_real_counters_in_the_background(tmp_path):
    _interface(tmp_path, "eth0", 0, 0)
    meter = LinkMeter(sample_s=0.05, root=str(tmp_path)).start()
    try:
        sent = 0
        deadline = time.monotonic() + 10
        while meter.up == 0.0:
            assert time.monotonic() < deadline, "no rate measured"
            sent += 4 * MIN_BYTES
            _interface(tmp_path, "eth0", sent, 0)
            time.sleep(0.05)
        assert meter.up >= MIN_BYTES and meter.down == 0.0
    finally:
        meter.stop()
    idle = LinkMeter(root=str(tmp_path / "nothing")).start()  # nothing to read: no thread at all
    assert idle._thread is None
