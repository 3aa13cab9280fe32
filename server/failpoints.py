"""Failpoints: named places where a test makes the server die for real, to prove crash safety.

Off unless ``CNND_FAILPOINTS`` names them, e.g. ``checkpoint.partial=kill@2`` (SIGKILL this
process the second time the point is reached). When off, a failpoint costs a dict lookup.
Points: ``checkpoint.partial`` (half a checkpoint written), ``checkpoint.rename`` (written and
synced, not yet renamed), ``version.commit`` (weights file in place, row not committed).
"""

from __future__ import annotations

import os
import signal
import threading

_lock = threading.Lock()
_hits: dict[str, int] = {}


def _parse(spec: str) -> dict[str, int]:
    points = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        name, _, action = item.partition("=")
        kind, _, nth = action.partition("@")
        if kind != "kill":
            raise ValueError(f"CNND_FAILPOINTS: unknown action {action!r} for {name!r}")
        points[name] = int(nth or 1)
    return points


_ACTIVE = _parse(os.environ.get("CNND_FAILPOINTS", ""))


def failpoint(name: str) -> None:
    """SIGKILL this process here if the point is armed and its hit count is reached."""
    nth = _ACTIVE.get(name)
    if nth is None:
        return
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        if _hits[name] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
