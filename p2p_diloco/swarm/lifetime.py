"""Processes that die with their parent: no orphaned DHT, averager or p2pd after a SIGKILLed peer."""

from __future__ import annotations

import ctypes
import signal


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (no orphaned averagers or p2pd)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: orphans are then possible after a SIGKILL of the parent
        pass
