"""This machine's link rates, learned from its own transfers.

A peer's uplink rate decides how much of a fragment it reduces (load balancing)
and how long its chunks may take (deadlines, README "Deadlines"). A declared rate
(`join --bandwidth`) can be missing or wrong; the transfers themselves tell. A
`LinkMeter` reads the kernel's byte counters of this network namespace's
interfaces (`/sys/class/net/*/statistics`, loopback left out: it has no link
rate) every SAMPLE_S seconds in a thread of its own, and keeps the highest rate
seen over one sample: during an all-reduce a member sends to every reducer at
once, so its uplink runs full for a while and the peak is the link's rate. The
peak decays (half-life HALF_LIFE_S) so that a link that got slower is learned
again. A sample that moved under MIN_BYTES says nothing about the link (idle
between rounds) and is ignored. Nothing here sends a packet.

On one machine without emulated links (every peer on loopback) nothing is
measured and the declared rate (or "unknown") stands. Other traffic of the
machine counts too: the rate is what its link carried, a lower bound of what
it can carry.
"""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger(__name__)

SAMPLE_S = 1.0
HALF_LIFE_S = 600.0
MIN_BYTES = 256 * 1024
SYS_NET = "/sys/class/net"


def read_counters(root: str = SYS_NET) -> tuple[int, int] | None:
    """(bytes sent, bytes received) over this namespace's interfaces but loopback; None when unreadable or
    there is no such interface."""
    try:
        names = [n for n in os.listdir(root) if n != "lo"]
    except OSError:
        return None
    sent = received = 0
    found = False
    for name in names:
        try:
            with open(os.path.join(root, name, "statistics", "tx_bytes")) as f:
                tx = int(f.read())
            with open(os.path.join(root, name, "statistics", "rx_bytes")) as f:
                rx = int(f.read())
        except (OSError, ValueError):
            continue
        sent, received, found = sent + tx, received + rx, True
    return (sent, received) if found else None


class LinkMeter:
    """The peak up/down rates (bytes/s) this machine's interfaces carried, decaying; 0.0 while unmeasured."""

    def __init__(self, sample_s: float = SAMPLE_S, half_life_s: float = HALF_LIFE_S, root: str = SYS_NET):
        self.sample_s, self.half_life_s, self.root = sample_s, half_life_s, root
        self._peaks = [0.0, 0.0]  # up, down
        self._at = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def up(self) -> float:
        return self._peak(0)

    @property
    def down(self) -> float:
        return self._peak(1)

    def _peak(self, i: int) -> float:
        with self._lock:
            return self._peaks[i] * 0.5 ** ((time.monotonic() - self._at) / self.half_life_s)

    def observe(self, sent: int, received: int, seconds: float) -> None:
        """One sample: `sent` and `received` bytes over `seconds`."""
        if seconds <= 0:
            return
        now = time.monotonic()
        with self._lock:
            decay = 0.5 ** ((now - self._at) / self.half_life_s)
            self._at = now
            for i, moved in enumerate((sent, received)):
                self._peaks[i] *= decay
                if moved >= MIN_BYTES:
                    self._peaks[i] = max(self._peaks[i], moved / seconds)

    def start(self) -> "LinkMeter":
        """Sample in the background until `stop`; a namespace without counters (or only loopback) is not
        sampled at all."""
        if self._thread is None and read_counters(self.root) is not None:
            self._thread = threading.Thread(target=self._sample, name="link meter", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _sample(self) -> None:
        last, at = read_counters(self.root), time.monotonic()
        while not self._stop.wait(self.sample_s):
            now_counters, now = read_counters(self.root), time.monotonic()
            if now_counters is None or last is None:
                last, at = now_counters, now
                continue
            self.observe(max(0, now_counters[0] - last[0]), max(0, now_counters[1] - last[1]), now - at)
            last, at = now_counters, now
