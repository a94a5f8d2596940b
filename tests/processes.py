"""Helpers for tests that start real processes."""

from __future__ import annotations

import subprocess


def p2pd_pids() -> set[int]:
    """Every hivemind p2pd daemon running on this machine (a test checks that it left none of its own behind)."""
    out = subprocess.run(["pgrep", "-x", "p2pd"], capture_output=True, text=True).stdout
    return {int(x) for x in out.split()}
