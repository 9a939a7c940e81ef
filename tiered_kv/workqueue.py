"""A bounded queue of jobs served by background threads, that callers can wait on until it is idle.

Used for the writes that must never block serving: demotions queued toward the disk tier and writes to the
remote tier. Capacity is counted in units (blocks), reserved before a job is built so that a full queue drops
work (the caller counts it) instead of blocking.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

__all__ = ["WorkQueue"]

log = logging.getLogger("tiered_kv.workqueue")

T = TypeVar("T")


class WorkQueue(Generic[T]):
    """Jobs of some units each, at most ``capacity`` units queued or in progress.

    Args:
        capacity: bound in units (blocks).
        size: units of a job.
        handle: called on a worker thread for each job; must not raise (exceptions are logged).
        workers: worker threads (0: no workers, only the idle tracking of :meth:`busy`).
        name: thread name prefix.
        merge: combines two queued jobs into one (None: they cannot be combined); a worker groups what is queued
            behind its job, up to ``merge_units`` units, so a backlog is served with fewer, larger writes.
        merge_units: see ``merge``.
    """

    def __init__(
        self,
        capacity: int,
        size: Callable[[T], int],
        handle: Callable[[T], None],
        workers: int,
        name: str,
        *,
        merge: Callable[[T, T], T | None] | None = None,
        merge_units: int = 0,
    ) -> None:
        self.capacity = capacity
        self._size = size
        self._handle = handle
        self._merge = merge
        self._merge_units = merge_units
        # Each job and busy() section gets a ticket: drain() waits for what started before it was called, so a
        # steady stream of new work cannot starve it.
        self._jobs: deque[tuple[int, T]] = deque()
        self._running: dict[int, int] = {}  # tickets of jobs and busy() sections in progress -> how many
        self._tickets = 0
        self._units = 0  # reserved, queued or in progress
        self._busy = 0
        self._stopped = False
        lock = threading.Lock()
        self.cond = threading.Condition(lock)  # state changes; drain() waits on it
        # Workers sleep on their own condition over the same lock: only a new job or stop() wakes them, not every
        # end of a busy() section (an idle manager's threads stay asleep).
        self._work_cond = threading.Condition(lock)
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    @property
    def depth(self) -> int:
        """Units reserved, queued or in progress."""
        return self._units

    @property
    def stopped(self) -> bool:
        """Whether :meth:`stop` has run."""
        return self._stopped

    def reserve(self, n: int) -> int:
        """Reserve room for up to ``n`` units now; returns how many were reserved (0 once stopped)."""
        with self.cond:
            take = 0 if self._stopped else max(0, min(n, self.capacity - self._units))
            self._units += take
            return take

    def unreserve(self, n: int) -> None:
        """Give back reserved units that will not be queued."""
        with self.cond:
            self._units -= n
            self.cond.notify_all()

    def put(self, job: T) -> None:
        """Queue a job whose units were reserved."""
        with self.cond:
            self._tickets += 1
            self._jobs.append((self._tickets, job))
            self._work_cond.notify()

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Mark work outside the queue (a cleaning pass) that :meth:`drain` must wait for too."""
        with self.cond:
            self._busy += 1
            self._tickets += 1
            ticket = self._tickets
            self._running[ticket] = 1
        try:
            yield
        finally:
            with self.cond:
                self._busy -= 1
                del self._running[ticket]
                self.cond.notify_all()

    def _work(self) -> None:
        while True:
            with self.cond:
                while not self._jobs and not self._stopped:
                    self._work_cond.wait()
                if not self._jobs:
                    return
                ticket, job = self._jobs.popleft()
                # Group what is queued behind it (one write, one commit), up to merge_units. The merged job
                # carries the first ticket: drain() waits for it as long as for any of the merged ones.
                if self._merge is not None:
                    units = self._size(job)
                    while self._jobs and units + self._size(self._jobs[0][1]) <= self._merge_units:
                        merged = self._merge(job, self._jobs[0][1])
                        if merged is None:
                            break
                        units += self._size(self._jobs.popleft()[1])
                        job = merged
                self._busy += 1
                self._running[ticket] = self._running.get(ticket, 0) + 1
            try:
                self._handle(job)
            except Exception:  # a worker must survive anything; the handler counts its own failures
                log.exception("work queue job failed")
            finally:
                with self.cond:
                    self._busy -= 1
                    left = self._running[ticket] - 1
                    if left:
                        self._running[ticket] = left
                    else:
                        del self._running[ticket]
                    self._units -= self._size(job)
                    self.cond.notify_all()

    def threads(self) -> list[threading.Thread]:
        """The worker threads."""
        return list(self._threads)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no unit is reserved, queued or in progress (busy() sections aside); False on timeout."""
        with self.cond:
            return self.cond.wait_for(lambda: self._units == 0, timeout)

    def _pending_through(self, ticket: int) -> bool:
        """Whether a job or busy() section with a ticket up to ``ticket`` is queued or in progress. Lock held."""
        if self._jobs and self._jobs[0][0] <= ticket:  # FIFO: the oldest queued job has the lowest ticket
            return True
        return any(t <= ticket for t in self._running)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every job queued and every :meth:`busy` section started before this call has finished;
        False on timeout. Work that starts meanwhile is not waited for (a steady stream cannot starve it)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            through = self._tickets
            while self._pending_through(through):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self.cond.wait(left)
        return True

    def stop(self, timeout: float = 10.0) -> list[T]:
        """Drain (up to ``timeout``), stop the workers and return the jobs that were still queued (dropped)."""
        self.drain(timeout)
        with self.cond:
            self._stopped = True
            dropped = [job for _, job in self._jobs]
            self._jobs.clear()
            self._units -= sum(self._size(j) for j in dropped)
            self.cond.notify_all()
            self._work_cond.notify_all()
        for t in self._threads:
            t.join(timeout)
        return dropped
