"""A peer's processes: they die with their parent (no orphaned DHT, averager or p2pd after a SIGKILLed peer),
and their peak memory is read from /proc."""

from __future__ import annotations

import ctypes
import os
import signal


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (no orphaned averagers or p2pd)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: orphans are then possible after a SIGKILL of the parent
        pass


def descendants(pid: int) -> list[int]:
    """`pid`'s children, their children, and so on (Linux /proc; [] elsewhere)."""
    try:
        parents = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
    except OSError:
        return []
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def peak_memory(pid: int) -> int:
    """Bytes: the sum over `pid` and its descendants of each one's peak resident memory (VmHWM) so far; an upper
    bound on what they held at any one time. 0 where /proc does not say."""
    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            with open(f"/proc/{p}/status") as f:
                total += next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), 0)
        except (OSError, ValueError):
            continue
    return total
