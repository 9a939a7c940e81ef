"""An eviction policy given as seed 001's ``should_evict(block)`` predicate over block metadata.

Seed 001 lets a user write only ``should_evict(block) -> bool`` (e.g. "not used for five minutes"). Here that
predicate ranks the evictable entries of a pool kept in LRU order: :meth:`PredicatePolicy.evict` returns the least
recently used evictable entry the predicate approves, and, when it approves none, the least recently used evictable
entry, because a pool that needs a slot must get one (an allocation never fails because of the predicate).
Finding a victim scans from the LRU end, so it costs O(entries skipped): a predicate should be cheap.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from itertools import islice

from .base import EvictionPolicy, PolicyFactory

__all__ = ["BlockMetadata", "PredicatePolicy", "ShouldEvict", "predicate_policy"]


@dataclass(frozen=True, slots=True)
class BlockMetadata:
    """What a ``should_evict`` predicate sees of one cached block.

    Attributes:
        sequence_hash: the block's key in its pool.
        last_access_time: ``time.monotonic()`` of its registration or latest hit or release.
        access_count: registrations and hits so far.
        priority: set with :meth:`PredicatePolicy.set_priority` (0 by default); the predicate decides what it means.
    """

    sequence_hash: Hashable
    last_access_time: float
    access_count: int = 1
    priority: int = 0


ShouldEvict = Callable[[BlockMetadata], bool]


class PredicatePolicy(EvictionPolicy):
    """LRU order, victims chosen by ``should_evict`` first (see the module docstring).

    Args:
        capacity: the pool's number of blocks.
        should_evict: ``should_evict(BlockMetadata) -> bool``; an exception it raises propagates to the caller
            that needed room.
    """

    def __init__(self, capacity: int, should_evict: ShouldEvict) -> None:
        if not callable(should_evict):
            raise ValueError(f"should_evict must be callable, got {type(should_evict).__name__}")
        self.capacity = capacity
        self.should_evict = should_evict
        self._lru: OrderedDict[Hashable, BlockMetadata] = OrderedDict()  # evictable, least recent first
        self._held: dict[Hashable, BlockMetadata] = {}
        self._priority: dict[Hashable, int] = {}

    @classmethod
    def factory(cls, should_evict: ShouldEvict) -> PolicyFactory:
        """A ``factory(capacity)`` for :func:`~tiered_kv.policies.register_eviction_policy`."""
        if not callable(should_evict):
            raise ValueError(f"should_evict must be callable, got {type(should_evict).__name__}")
        return lambda capacity: cls(capacity, should_evict)

    def set_priority(self, key: Hashable, priority: int) -> None:
        """Attach a priority to a cached entry (kept until the entry leaves); unknown keys are ignored."""
        meta = self._lru.get(key) or self._held.get(key)
        if meta is None:
            return
        self._priority[key] = priority
        new = replace(meta, priority=priority)
        if key in self._lru:
            self._lru[key] = new
        else:
            self._held[key] = new

    def metadata(self, key: Hashable) -> BlockMetadata | None:
        """The metadata the predicate would see for ``key``, or None."""
        return self._lru.get(key) or self._held.get(key)

    # --- the pool interface ----------------------------------------------------------------------------------
    def insert(self, key: Hashable, evictable: bool) -> None:
        old = self._lru.pop(key, None) or self._held.pop(key, None)
        count = old.access_count + 1 if old is not None else 1
        meta = BlockMetadata(key, time.monotonic(), count, self._priority.get(key, 0))
        if evictable:
            self._lru[key] = meta
        else:
            self._held[key] = meta

    def touch(self, key: Hashable) -> None:
        for where in (self._lru, self._held):
            meta = where.get(key)
            if meta is not None:
                where[key] = replace(meta, last_access_time=time.monotonic(), access_count=meta.access_count + 1)
                if where is self._lru:
                    self._lru.move_to_end(key)
                return

    def set_evictable(self, key: Hashable, evictable: bool) -> None:
        if evictable:
            meta = self._held.pop(key, None)
            if meta is not None:
                self._lru[key] = replace(meta, last_access_time=time.monotonic())
        else:
            meta = self._lru.pop(key, None)
            if meta is not None:
                self._held[key] = meta

    def set_evictable_as_victim(self, key: Hashable) -> None:
        # A mover's hold (copying the block down) is not a use: the block goes back among the next victims.
        held = key in self._held
        self.set_evictable(key, True)
        if held:
            self._lru.move_to_end(key, last=False)

    def evict(self) -> Hashable | None:
        if not self._lru:
            return None
        victim = next((k for k, meta in self._lru.items() if self.should_evict(meta)), None)
        if victim is None:
            victim = next(iter(self._lru))
        del self._lru[victim]
        self._priority.pop(victim, None)
        return victim

    def remove(self, key: Hashable) -> None:
        self._lru.pop(key, None)
        self._held.pop(key, None)
        self._priority.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._lru or key in self._held

    def __len__(self) -> int:
        return len(self._lru) + len(self._held)

    def evictable_count(self) -> int:
        return len(self._lru)

    def clear(self) -> None:
        self._lru.clear()
        self._held.clear()
        self._priority.clear()

    def candidates(self, n: int) -> list[Hashable]:
        approved = [k for k, meta in islice(self._lru.items(), 4 * n) if self.should_evict(meta)]
        return approved[:n] if approved else list(islice(self._lru, n))


def predicate_policy(should_evict: ShouldEvict) -> PolicyFactory:
    """``register_eviction_policy(name, predicate_policy(should_evict))``: the seed's predicate as a policy."""
    return PredicatePolicy.factory(should_evict)
