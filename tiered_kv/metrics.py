"""Metrics: per-pool counters, eviction events and residency times, and the latency recorders.

* :class:`PoolMetrics` — one per pool: hits, misses, evictions (with per-second rates), residency of evicted
  blocks, recent :class:`EvictionEvent` records (what ``tiered_kv.compat``'s ``KVCacheMetricsCollector`` reads).
* :class:`LatencyHistogram` — log-spaced buckets with quantiles, for latencies observed without bound (the offload
  scheduler's demotions and promotions).
* :class:`RecentLatencies` — the newest N latencies, exact percentiles (the remote store's calls).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat

__all__ = ["EvictionEvent", "LatencyHistogram", "PoolMetrics", "RecentLatencies", "percentile"]

#: Horizon of the per-second eviction counters behind :meth:`PoolMetrics.eviction_rate`.
RATE_HORIZON_S = 3600


@dataclass(frozen=True, slots=True)
class EvictionEvent:
    """One block evicted from a pool.

    ``residency_s``: how long the block had been registered in this pool when it was evicted (for blocks found on
    disk when the tier was opened, counted from the opening).
    """

    tier: str
    sequence_hash: bytes
    block_id: int
    reason: str
    timestamp: float
    residency_s: float = 0.0


class PoolMetrics:
    """Counters of one pool. Updated under the pool's lock; read without it (ints are atomic to read).

    Eviction rates come from per-second counters (exact to the second over the last hour, and exact for any window
    that covers every eviction), not from the retained events, which are only the newest ``keep_events`` for
    inspection.
    """

    __slots__ = (
        "_buckets",
        "_created",
        "_events",
        "_first_eviction",
        "_residencies",
        "corrupt",
        "evictions",
        "hits",
        "misses",
        "orphans_refused",
        "residency_count",
        "residency_max_s",
        "residency_total_s",
        "stored_at",
        "tier",
    )

    def __init__(self, tier: str, keep_events: int = 1024) -> None:
        self.tier = tier
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.corrupt = 0
        self.orphans_refused = 0  # registrations not cached because no tier held their parent
        # Plain tuples on the hot path; EvictionEvent objects are built only when someone asks for them.
        self._events: deque[tuple[bytes, int, str, float, float]] = deque(maxlen=keep_events)
        # [monotonic second, evictions in it]: one entry per second that saw evictions, at most an hour of them.
        self._buckets: deque[list[int]] = deque(maxlen=RATE_HORIZON_S)
        self._first_eviction: float | None = None
        self._created = time.monotonic()
        # slot -> monotonic time its current block was registered (bounded by the pool's slot count).
        self.stored_at: dict[int, float] = {}
        self.residency_count = 0
        self.residency_total_s = 0.0
        self.residency_max_s = 0.0
        self._residencies: deque[float] = deque(maxlen=keep_events)

    def note_stored(self, slots: Iterable[int]) -> None:
        """Remember when blocks were registered in ``slots`` (the start of their residency)."""
        now = time.monotonic()
        stored_at = self.stored_at
        for slot in slots:
            stored_at[slot] = now

    def record_evictions(self, victims: list[tuple[bytes, int]], reason: str) -> None:
        """Count evicted ``(hash, slot)`` pairs, their residency, and keep them as recent events."""
        if not victims:
            return
        now = time.time()
        mono = time.monotonic()
        pop, created = self.stored_at.pop, self._created
        hashes, slots = zip(*victims)
        res = [mono - pop(slot, created) for slot in slots]
        self._count(len(victims), mono)
        self.residency_count += len(res)
        self.residency_total_s += sum(res)
        self.residency_max_s = max(self.residency_max_s, max(res))
        self._residencies.extend(res)
        self._events.extend(zip(hashes, slots, repeat(reason), repeat(now), res))  # tuples built in C

    def record_event(self, event: EvictionEvent) -> None:
        """Count an eviction reported from outside the pool (the compat facade's ``record_eviction``) and keep it."""
        self._count(1, time.monotonic())
        self._events.append((event.sequence_hash, event.block_id, event.reason, event.timestamp, event.residency_s))

    def _count(self, n: int, mono: float) -> None:
        self.evictions += n
        if self._first_eviction is None:
            self._first_eviction = mono
        sec = int(mono)
        buckets = self._buckets
        if buckets and buckets[-1][0] == sec:
            buckets[-1][1] += n
        else:
            buckets.append([sec, n])

    def recent_evictions(self, limit: int = 100) -> list[EvictionEvent]:
        """The newest ``limit`` eviction events, newest last."""
        events = list(self._events)[-limit:] if limit > 0 else []
        return [EvictionEvent(self.tier, h, slot, reason, ts, r) for h, slot, reason, ts, r in events]

    def eviction_rate(self, window_seconds: float = 60.0) -> float:
        """Evictions per second over the last ``window_seconds``, from the per-second counters.

        A second that straddles the window's start counts whole, so short windows may read slightly high.
        """
        if isinstance(window_seconds, bool) or not isinstance(window_seconds, (int, float)) or window_seconds <= 0:
            raise ValueError(f"window_seconds must be > 0, got {window_seconds!r}")
        first = self._first_eviction
        if first is None:
            return 0.0
        now = time.monotonic()
        cutoff = now - window_seconds
        if first >= cutoff:
            return self.evictions / window_seconds
        total = 0
        for sec, n in reversed(list(self._buckets)):  # list(): one C-level copy, safe against a concurrent append
            if sec + 1 <= cutoff:
                break
            total += n
        return total / window_seconds

    def residency(self) -> dict[str, float | int]:
        """How long evicted blocks had stayed in this pool: count, mean, max, and median / p99 of the newest."""
        n = self.residency_count
        recent = sorted(self._residencies)
        return {
            "count": n,
            "mean_s": self.residency_total_s / n if n else 0.0,
            "max_s": self.residency_max_s,
            "p50_s": percentile(recent, 50),
            "p99_s": percentile(recent, 99),
        }

    @property
    def hit_rate(self) -> float:
        """hits / (hits + misses), 0.0 before any lookup."""
        looked = self.hits + self.misses
        return self.hits / looked if looked else 0.0


def percentile(ordered: Sequence[float], pct: int) -> float:
    """The ``pct``-th percentile (0..100) of already sorted samples, nearest rank below; 0.0 when empty.

    Integer arithmetic on purpose: ``int(0.99 * n)`` can round down one rank for some ``n``.
    """
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, (pct * len(ordered)) // 100)]


class RecentLatencies:
    """The newest ``keep`` latencies (seconds) and their exact percentiles.

    ``observe`` is a ``deque.append`` (atomic); readers copy the deque in one C call, so no lock is needed.
    """

    __slots__ = ("_samples",)

    def __init__(self, keep: int = 4096) -> None:
        self._samples: deque[float] = deque(maxlen=keep)

    def observe(self, seconds: float) -> None:
        """Record one latency (the oldest drops out past ``keep``)."""
        self._samples.append(seconds)

    def percentiles(self, *pcts: int) -> tuple[float, ...]:
        """The given percentiles (0..100) of the retained samples, in seconds (0.0 each when there are none)."""
        ordered = sorted(self._samples)
        return tuple(percentile(ordered, p) for p in pcts)

    def __len__(self) -> int:
        return len(self._samples)


class LatencyHistogram:
    """Log-spaced latency buckets (seconds) with count, sum and quantiles; cheap to update, thread-safe.

    Quantiles are bucket upper bounds (4 buckets per decade: within a factor of 1.78 of the true value).
    """

    BOUNDS: tuple[float, ...] = tuple(10.0 ** (e / 4) for e in range(-24, 5))  # 1 us .. ~18 s, 4 buckets per decade

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BOUNDS) + 1)
        self.total = 0.0
        self.n = 0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        """Record one latency."""
        i = bisect.bisect_left(self.BOUNDS, seconds)  # the first bucket whose bound is >= seconds
        with self._lock:
            self.counts[i] += 1
            self.total += seconds
            self.n += 1

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding the ``q`` quantile (0.0 when empty; inf past the last bound)."""
        with self._lock:
            counts, n = list(self.counts), self.n
        if n == 0:
            return 0.0
        rank = q * n
        seen = 0
        for i, c in enumerate(counts):
            seen += c
            if seen >= rank:
                return self.BOUNDS[i] if i < len(self.BOUNDS) else float("inf")
        return float("inf")

    def summary(self) -> dict[str, float]:
        """count, mean, p50, p99 (seconds)."""
        return {
            "count": self.n,
            "mean": self.total / self.n if self.n else 0.0,
            "p50": self.quantile(0.5),
            "p99": self.quantile(0.99),
        }
