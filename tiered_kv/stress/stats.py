"""Counters and latency histograms of a stress run: one :class:`Stats` per client (no lock on the hot path),
merged for reports and carried across process lives as plain dicts."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Histogram", "Stats", "COUNTERS"]

#: The counters every :class:`Stats` has.
COUNTERS = (
    "ops",  # requests served (match + allocate + register + release)
    "blocks_requested",  # hashes asked for by matches
    "blocks_matched",  # blocks returned by matches
    "blocks_allocated",  # missing blocks allocated, filled and registered
    "blocks_verified",  # blocks whose bytes were compared with the expected bytes (any tier)
    "verified_device",
    "verified_host",
    "verified_disk",
    "wrong",  # a returned block whose bytes differ from what was registered under its hash
    "lost",  # a block that must be present (durable, not evicted) and is not
    "unreachable",  # a durable block dropped at a reopen because an ancestor was lost (a match could not reach it)
    "not_prefix_closed",  # blocks on disk after a reopen whose parent is not on disk (must stay 0)
    "errors",  # exceptions surfaced to a client by the store (counted as detected faults)
    "client_failures",  # a client died on an unexpected exception from the store (a bug either way)
    "backpressure",  # allocations refused for lack of room (the client backed off)
    "documents",  # one-time documents served
)


class Histogram:
    """Log-spaced latency buckets (seconds), mergeable; quantiles are bucket upper bounds."""

    BOUNDS: tuple[float, ...] = tuple(10.0 ** (e / 8) for e in range(-56, 9))  # 100 ns .. 10 s, 8 per decade

    def __init__(self, counts: list[int] | None = None) -> None:
        self.counts = list(counts) if counts is not None else [0] * (len(self.BOUNDS) + 1)

    def observe(self, seconds: float) -> None:
        """Record one latency."""
        self.counts[bisect.bisect_left(self.BOUNDS, seconds)] += 1

    @property
    def count(self) -> int:
        """Number of observations."""
        return sum(self.counts)

    def merge(self, other: Histogram) -> None:
        """Add ``other``'s observations."""
        for i, c in enumerate(other.counts):
            self.counts[i] += c

    def quantile(self, q: float) -> float:
        """Upper bound (seconds) of the bucket holding quantile ``q``; 0.0 when empty."""
        n = self.count
        if n == 0:
            return 0.0
        rank, seen = q * n, 0
        for i, c in enumerate(self.counts):
            seen += c
            if c and seen >= rank:
                return self.BOUNDS[min(i, len(self.BOUNDS) - 1)]
        return self.BOUNDS[-1]


@dataclass
class Stats:
    """Counters and the match/allocate latency histograms of one client (or of a whole run, merged)."""

    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    match_latency: Histogram = field(default_factory=Histogram)
    allocate_latency: Histogram = field(default_factory=Histogram)

    def add(self, name: str, n: int = 1) -> None:
        """Add ``n`` to one counter."""
        self.counters[name] += n

    def __getitem__(self, name: str) -> int:
        return self.counters[name]

    def merge(self, other: Stats) -> None:
        """Add another client's (or life's) numbers to these."""
        for k, v in other.counters.items():
            self.counters[k] = self.counters.get(k, 0) + v
        self.match_latency.merge(other.match_latency)
        self.allocate_latency.merge(other.allocate_latency)

    @classmethod
    def merged(cls, parts: list[Stats]) -> Stats:
        """A new :class:`Stats` summing ``parts``."""
        out = cls()
        for p in parts:
            out.merge(p)
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (for the child process's journal)."""
        return {"counters": dict(self.counters), "match": self.match_latency.counts,
                "allocate": self.allocate_latency.counts}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Stats:
        """Inverse of :meth:`to_dict`."""
        counters = dict.fromkeys(COUNTERS, 0)
        counters.update({k: int(v) for k, v in doc["counters"].items()})
        return cls(counters, Histogram(doc["match"]), Histogram(doc["allocate"]))
