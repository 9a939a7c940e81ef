"""Per-pool counters and eviction events (seed 000's KVCacheMetricsCollector)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

__all__ = ["EvictionEvent", "PoolMetrics"]


@dataclass(frozen=True, slots=True)
class EvictionEvent:
    """One block evicted from a pool."""

    tier: str
    sequence_hash: bytes
    block_id: int
    reason: str
    timestamp: float


class PoolMetrics:
    """Counters of one pool. Updated under the pool's lock; read without it (ints are atomic to read)."""

    __slots__ = ("_events", "corrupt", "evictions", "hits", "misses", "orphans_refused", "tier")

    def __init__(self, tier: str, keep_events: int = 1024) -> None:
        self.tier = tier
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.corrupt = 0
        self.orphans_refused = 0  # registrations not cached because no tier held their parent
        # Plain tuples on the hot path; EvictionEvent objects are built only when someone asks for them.
        self._events: deque[tuple[bytes, int, str, float]] = deque(maxlen=keep_events)

    def record_evictions(self, victims: list[tuple[bytes, int]], reason: str) -> None:
        """Count evicted ``(hash, slot)`` pairs and keep them as recent events."""
        now = time.time()
        self.evictions += len(victims)
        self._events.extend([(h, slot, reason, now) for h, slot in victims])

    def recent_evictions(self, limit: int = 100) -> list[EvictionEvent]:
        """The newest ``limit`` eviction events, newest last."""
        events = list(self._events)[-limit:] if limit > 0 else []
        return [EvictionEvent(self.tier, h, slot, reason, ts) for h, slot, reason, ts in events]

    def eviction_rate(self, window_seconds: float = 60.0) -> float:
        """Evictions per second over the last ``window_seconds`` (from the retained events)."""
        if window_seconds <= 0:
            raise ValueError(f"window_seconds must be > 0, got {window_seconds}")
        cutoff = time.time() - window_seconds
        n = sum(1 for e in list(self._events) if e[3] >= cutoff)
        return n / window_seconds

    @property
    def hit_rate(self) -> float:
        """hits / (hits + misses), 0.0 before any lookup."""
        looked = self.hits + self.misses
        return self.hits / looked if looked else 0.0
