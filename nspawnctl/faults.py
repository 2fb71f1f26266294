"""Fault injection, for the tests that kill nspawnctl at every step of a change
(tests/integration/test_faults.py). Off unless NSPAWNCTL_KILL_AT is set."""

from __future__ import annotations

import contextlib
import os
import signal

from nspawnctl.log import log

_checkpoints = 0


def checkpoint(where: str) -> None:
    """With NSPAWNCTL_KILL_AT=N, the process SIGKILLs itself at its N-th checkpoint: no
    handler, no finally, no undo runs, as with a power cut."""
    global _checkpoints  # noqa: PLW0603 - one count per process, by design
    target = os.environ.get("NSPAWNCTL_KILL_AT")
    if not target:
        return
    _checkpoints += 1
    if _checkpoints == int(target):
        log.warning("NSPAWNCTL_KILL_AT=%s: killed at %s", target, where)
        with contextlib.suppress(OSError):
            os.kill(os.getpid(), signal.SIGKILL)
