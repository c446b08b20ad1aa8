"""Child processes that end with their parent: no libp2p daemon (or local-swarm server) outlives the
process that started it, however that process ends (SIGKILL included).

Linux delivers a chosen signal to a child when the thread that forked it exits (``PR_SET_PDEATHSIG``);
the child sets it for itself between fork and exec (``end_with_parent``), so it holds across the
exec. It is tied to the forking *thread*: spawn from a thread that lives as long as the child should
(the DHT's loop thread for p2pd, the main thread for a local swarm). Elsewhere it is a no-op.

hivemind starts p2pd with ``asyncio.subprocess.create_subprocess_exec`` and no hook, so
``daemons_end_with_parent`` wraps that function once per process: a program named ``p2pd`` gets
``end_with_parent`` as its ``preexec_fn``; every other call passes through unchanged.
"""

from __future__ import annotations

import asyncio.subprocess
import ctypes
import functools
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h
DAEMON_NAME = "p2pd"


def _prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()


def end_with_parent(sig: int = signal.SIGTERM):
    """A ``preexec_fn``: the child gets ``sig`` when the thread that spawned it exits (Linux; else None)."""
    if _PRCTL is None:
        return None
    parent = os.getpid()

    def preexec() -> None:  # runs in the child, after fork and before exec
        _PRCTL(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return preexec


def daemons_end_with_parent() -> None:
    """Make every p2pd this process starts end with the thread that starts it. Idempotent."""
    original = asyncio.subprocess.create_subprocess_exec
    if getattr(original, "_stamen_wrapped", False) or _PRCTL is None:
        return

    @functools.wraps(original)
    async def create_subprocess_exec(program, *args, **kwargs):
        if os.path.basename(str(program)) == DAEMON_NAME and kwargs.get("preexec_fn") is None:
            kwargs["preexec_fn"] = end_with_parent()
        return await original(program, *args, **kwargs)

    create_subprocess_exec._stamen_wrapped = True
    asyncio.subprocess.create_subprocess_exec = create_subprocess_exec
