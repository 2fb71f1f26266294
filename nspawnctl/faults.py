"""Fault injection, for the tests that kill nspawnctl at every step of a change
(tests/integration/test_faults.py), or stop it there while they act meanwhile
(tests/integration/test_hostile.py). Off unless NSPAWNCTL_KILL_AT or
NSPAWNCTL_PAUSE_AT is set."""

from __future__ import annotations

import contextlib
import os
import signal

from nspawnctl.log import log

_checkpoints = 0


def checkpoint(where: str) -> None:
    """With NSPAWNCTL_KILL_AT=N, the process SIGKILLs itself at its N-th checkpoint: no
    handler, no finally, no undo runs, as with a power cut. N may also be words of the
    checkpoint's own name: each checkpoint whose name has them."""
    global _checkpoints  # noqa: PLW0603 - one count per process, by design
    kill, pause = os.environ.get("NSPAWNCTL_KILL_AT"), os.environ.get("NSPAWNCTL_PAUSE_AT")
    if not (kill or pause):
        return
    _checkpoints += 1
    for target, variable, sig in ((kill, "KILL", signal.SIGKILL), (pause, "PAUSE", signal.SIGSTOP)):
        if target and (_checkpoints == int(target) if target.isdigit() else target in where):
            # With SIGSTOP the test sends SIGCONT when it has done what it does meanwhile.
            log.warning("NSPAWNCTL_%s_AT=%s: %s at %s", variable, target, sig.name, where)
            with contextlib.suppress(OSError):
                os.kill(os.getpid(), sig)
