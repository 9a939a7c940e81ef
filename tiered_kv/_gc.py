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
import threading
import time
from collections.abc import Iterator

__all__ = ["MAX_PAUSE_S", "gc_paused"]

#: Overlapping pauses (several threads in bulk calls) never keep the collector off longer than this: past it, the
#: last pause to end re-enables the collector early and no new pause starts until every current one has ended.
MAX_PAUSE_S = 1.0

_lock = threading.Lock()
_depth = 0  # pauses in progress, all threads
_reenable = False  # the outermost pause found the collector enabled and has not re-enabled it yet
_since = 0.0  # monotonic start of the outermost pause


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic collector for the duration (nestable, thread-safe).

    The collector is re-enabled when the last overlapping pause ends, or early once pauses have overlapped for
    :data:`MAX_PAUSE_S`; it is never enabled by a pause that found it disabled (a process that runs with
    ``gc.disable()`` keeps it so). A ``gc.disable()`` made by other code while a pause is in progress is undone
    when that pause ends.
    """
    global _depth, _reenable, _since
    with _lock:
        if _depth == 0:
            _reenable = gc.isenabled()
            _since = time.monotonic()
            if _reenable:
                gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _reenable and (_depth == 0 or time.monotonic() - _since > MAX_PAUSE_S):
                _reenable = False
                gc.enable()
