"""KV events (what is stored or removed where) and memory-pressure callbacks, delivered off the hot path.

Pools publish events by appending to a deque (no lock, no callback under a pool lock); one dispatcher thread
delivers them to subscribers and checks the memory-pressure watchers. A router subscribes to keep track of
which tier of which worker holds which prefix.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pool import BlockPool

__all__ = ["KvEvent", "EventBus"]

log = logging.getLogger("tiered_kv.events")


@dataclass(frozen=True, slots=True)
class KvEvent:
    """Blocks stored in or removed from one tier."""

    kind: str  # "stored" | "removed"
    tier: str
    sequence_hashes: tuple[bytes, ...]
    timestamp: float
    #: "stored" events: each block's parent hash (None: a chain head), so a router can rebuild the prefix tree.
    parents: tuple[bytes | None, ...] | None = None


@dataclass
class _Watcher:
    callback: Callable[[str, float], None]
    threshold: float
    pool: BlockPool
    armed: bool = True


class EventBus:
    """Collects pool events and pressure checks; one daemon thread delivers them."""

    def __init__(self, interval: float = 0.05) -> None:
        self._queue: deque[KvEvent] = deque(maxlen=100_000)
        self._subscribers: list[Callable[[KvEvent], None]] = []
        self._watchers: list[_Watcher] = []
        self._interval = interval
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._delivering = threading.Lock()  # one deliverer at a time: the thread or deliver_now()

    @property
    def active(self) -> bool:
        """Whether anyone listens (pools skip publishing otherwise)."""
        return bool(self._subscribers)

    def publish(
        self, kind: str, tier: str, hashes: list[bytes], parents: list[bytes | None] | None = None
    ) -> None:
        """Queue an event; safe under any lock (a deque append)."""
        if hashes and self._subscribers:
            self._queue.append(
                KvEvent(kind, tier, tuple(hashes), time.time(), tuple(parents) if parents is not None else None)
            )
            self._wake.set()

    def subscribe(self, callback: Callable[[KvEvent], None]) -> Callable[[], None]:
        """Deliver every later event to ``callback`` (on the dispatcher thread); returns an unsubscribe function."""
        with self._lock:
            self._subscribers.append(callback)
            self._start()

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def watch(self, pool: BlockPool, threshold: float, callback: Callable[[str, float], None]) -> None:
        """Call ``callback(tier, usage)`` each time ``pool``'s usage rises to ``threshold`` or above."""
        with self._lock:
            self._watchers.append(_Watcher(callback, threshold, pool))
            self._start()

    def _start(self) -> None:
        if self._thread is None and not self._stop:
            self._thread = threading.Thread(target=self._run, name="tiered-kv-events", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self._interval)
            self._wake.clear()
            self.deliver_now()

    def deliver_now(self) -> None:
        """Deliver every queued event and run the pressure checks on this thread (the dispatcher's step)."""
        with self._delivering:
            self._deliver()
            self._check_pressure()

    def _deliver(self) -> None:
        while self._queue:
            ev = self._queue.popleft()
            for cb in list(self._subscribers):
                try:
                    cb(ev)
                except Exception:
                    log.exception("KV event subscriber %r failed", cb)

    def _check_pressure(self) -> None:
        for w in list(self._watchers):
            try:
                usage = w.pool.usage_rate()
            except Exception:
                continue
            if usage >= w.threshold and w.armed:
                w.armed = False
                try:
                    w.callback(w.pool.tier, usage)
                except Exception:
                    log.exception("memory pressure callback %r failed", w.callback)
            elif usage < w.threshold:
                w.armed = True

    def close(self) -> None:
        """Deliver what is queued and stop the thread."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)
        with self._delivering:
            self._deliver()
