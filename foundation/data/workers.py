"""DataLoader workers die with the process that started them.

A worker that outlives its trainer (SIGKILL, OOM killer, a rank torchrun stops) does not stop by itself:
torch's watchdog ends its loop, but at exit it joins its queue's feeder thread, which blocks on a pipe
nobody reads, and it stays alive (with its share of the dataset in memory) under pid 1. Linux's
parent-death signal (``prctl(PR_SET_PDEATHSIG)``) has the kernel kill it the moment its parent dies.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def _die_with(parent: int, worker_id: int) -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def dies_with_this_process() -> functools.partial:
    """A DataLoader ``worker_init_fn``: the worker is killed when this process dies (Linux)."""
    return functools.partial(_die_with, os.getpid())
