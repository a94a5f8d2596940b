"""Failpoints: named moments at which a peer can be made to crash, for fault-injection tests.

`P2P_DILOCO_FAILPOINT=NAME[:N]` in a peer's environment makes it SIGKILL its
whole process group (trainer, averager processes, p2pd: a machine losing power)
the N-th time (default: the first) one of its processes reaches NAME; at an error
point (ERROR_POINTS) the peer stays up and the code at that point fails instead.
Hits are counted per process, and each fragment's averager is a process of its own.
Unset, every failpoint is a no-op. The points:
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "P2P_DILOCO_FAILPOINT"

POINTS = {
    "matchmaking": "a group's leader, after it accepted a member and before the group's all-reduce began",
    "sending": "a member, after its part went out to a reducer and before the reducer's answer came back",
    "reducing": "a reducer, holding another member's part, before it answered with the mean",
    "serving_state": "a donor, after the first chunk of a fragment's state went out to a peer downloading it",
    "dropping_out": "a member, as its round's exchange begins: it gives up the round and stays up (an error point)",
    "silent": "a member, as its round's exchange begins: it sends nothing and tells nobody, as one the leader "
              "counted into a group it had left (an error point)",
}
ERROR_POINTS = {"dropping_out", "silent"}
__doc__ += "".join(f"\n  {name}: {what}." for name, what in POINTS.items())

_hits: dict[str, int] = {}


class FailpointError(ValueError):
    pass


def parse(spec: str | None) -> tuple[str, int] | None:
    """`NAME[:N]` -> (NAME, N); None or "" -> None; anything else is an error naming the problem."""
    if not spec:
        return None
    name, _, count = spec.partition(":")
    if name not in POINTS:
        raise FailpointError(f"{ENV}={spec!r}: unknown failpoint {name!r}; known: {', '.join(POINTS)}")
    if not count:
        return name, 1
    if not count.isdigit() or int(count) < 1:
        raise FailpointError(f"{ENV}={spec!r}: the hit count must be a whole number >= 1, not {count!r}")
    return name, int(count)


def armed() -> tuple[str, int] | None:
    """The failpoint set in this process's environment (validated)."""
    return parse(os.environ.get(ENV))


def reached(name: str) -> bool:
    """A process of this peer is at failpoint `name`: crash the whole peer if it is armed for this hit; at an
    error point, True instead (the caller fails as the point says)."""
    assert name in POINTS, name
    try:
        target = armed()
    except FailpointError:  # refused when the peer started; never fire on a spec that did not parse
        return False
    if target is None or target[0] != name:
        return False
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != target[1]:
        return False
    if name in ERROR_POINTS:
        print(f"failpoint {name} (hit {target[1]})", file=sys.stderr, flush=True)
        return True
    print(f"failpoint {name} (hit {target[1]}): SIGKILL to process group {os.getpgrp()}", file=sys.stderr,
          flush=True)
    os.killpg(os.getpgrp(), signal.SIGKILL)
    return False
