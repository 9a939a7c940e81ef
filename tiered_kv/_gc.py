"""Pausing the cyclic garbage collector around bulk work, safely across threads.

A promotion of thousands of blocks builds a few short-lived objects per block (handles, tensor views, I/O ops).
While they are alive, the collector's young-generation passes traverse them and move them toward the oldest
generation, whose growth then triggers a full collection of the whole heap: in a process holding a few hundred
thousand objects that is 80-120 ms here, in a serving engine's heap far more. Paused, the short-lived objects are
freed by reference counting and never traversed; what outlives the pause is collected as usual afterwards.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
from collections.abc import Iterator

__all__ = ["MAX_PAUSE_S", "gc_paused"]

#: Pauses of several threads that keep overlapping (a busy server's bulk calls) never keep the collector off much
#: longer than this: once the overlapping run is older, the next pause to start or end turns the collector back
#: on, and no pause starts again until that run is over. One thread's own pause (nested ones included) is never
#: cut short: it ends with its call.
MAX_PAUSE_S = 1.0

_lock = threading.Lock()
_depth = 0  # pauses in progress, all threads
_held: dict[int, int] = {}  # thread id -> its pauses in progress
_reenable = False  # the outermost pause found the collector enabled and has not re-enabled it yet
_since = 0.0  # monotonic start of the current run of overlapping pauses
_threads: set[int] = set()  # threads that have paused during the current run


def _expire_locked() -> None:
    global _reenable
    if _reenable and len(_threads) > 1 and time.monotonic() - _since > MAX_PAUSE_S:
        _reenable = False
        gc.enable()


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic collector for the duration (nestable, thread-safe).

    The collector is re-enabled when the last overlapping pause ends, or earlier under :data:`MAX_PAUSE_S`; it is
    never enabled by a pause that found it disabled (a process that runs with ``gc.disable()`` keeps it so). A
    ``gc.disable()`` made by other code while a pause is in progress is undone when the pauses end.
    """
    global _depth, _reenable, _since
    with _lock:
        if _depth == 0:
            _reenable = gc.isenabled()
            _since = time.monotonic()
            _threads.clear()
            if _reenable:
                gc.disable()
        me = threading.get_ident()
        _depth += 1
        _held[me] = _held.get(me, 0) + 1
        _threads.add(me)
        _expire_locked()
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _held[me] == 1:
                del _held[me]
            else:
                _held[me] -= 1
            if _depth == 0:
                if _reenable:
                    _reenable = False
                    gc.enable()
            else:
                _expire_locked()


def _after_fork_in_child() -> None:
    # The child has only the forking thread: pauses of other threads will never end there; its own will.
    global _lock, _depth, _reenable
    _lock = threading.Lock()
    me = threading.get_ident()
    mine = _held.get(me, 0)
    _held.clear()
    _threads.clear()
    _depth = mine
    if mine:
        _held[me] = mine
        _threads.add(me)
    elif _reenable:
        _reenable = False
        gc.enable()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
