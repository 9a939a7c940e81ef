"""Least-recently-used eviction."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from itertools import islice

from .base import EvictionPolicy

__all__ = ["LRUPolicy"]


class LRUPolicy(EvictionPolicy):
    """Evicts the evictable entry used least recently.

    Held entries (referenced or pinned) are kept outside the recency list; when one becomes evictable again it
    re-enters at the most recent end, because its holder just used it.
    """

    __slots__ = ("_held", "_lru", "capacity")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lru: OrderedDict[Hashable, None] = OrderedDict()
        self._held: set[Hashable] = set()

    def insert(self, key: Hashable, evictable: bool) -> None:
        if evictable:
            self._lru[key] = None
        else:
            self._held.add(key)

    def touch(self, key: Hashable) -> None:
        if key in self._lru:
            self._lru.move_to_end(key)

    def set_evictable(self, key: Hashable, evictable: bool) -> None:
        if evictable:
            if key in self._held:
                self._held.discard(key)
                self._lru[key] = None
        elif key in self._lru:
            del self._lru[key]
            self._held.add(key)

    def set_evictable_as_victim(self, key: Hashable) -> None:
        held = key in self._held
        self.set_evictable(key, True)
        if held:
            self._lru.move_to_end(key, last=False)

    def evict(self) -> Hashable | None:
        if not self._lru:
            return None
        return self._lru.popitem(last=False)[0]

    # Batch forms: the loops of the single forms with the lookups bound once (the pool calls these per batch).
    def insert_many(self, keys: Sequence[Hashable], evictable: bool) -> None:
        if evictable:
            lru = self._lru
            for key in keys:
                lru[key] = None
        else:
            self._held.update(keys)

    def touch_many(self, keys: Sequence[Hashable]) -> None:
        lru = self._lru
        move = lru.move_to_end
        for key in keys:
            if key in lru:
                move(key)

    def set_evictable_many(self, keys: Sequence[Hashable], evictable: bool) -> None:
        lru, held = self._lru, self._held
        if evictable:
            for key in keys:
                if key in held:
                    held.discard(key)
                    lru[key] = None
        else:
            for key in keys:
                if key in lru:
                    del lru[key]
                    held.add(key)

    def hit_many(self, keys: Sequence[Hashable], newly_held: Sequence[Hashable]) -> None:
        # A touch does nothing to a held key: held is all a hit does here.
        lru, held = self._lru, self._held
        for key in keys:
            if key in lru:
                del lru[key]
                held.add(key)

    def evict_many(self, n: int) -> list[Hashable]:
        lru = self._lru
        pop = lru.popitem
        return [pop(last=False)[0] for _ in range(min(n, len(lru)))]

    def remove(self, key: Hashable) -> None:
        self._lru.pop(key, None)
        self._held.discard(key)

    def __contains__(self, key: object) -> bool:
        return key in self._lru or key in self._held

    def __len__(self) -> int:
        return len(self._lru) + len(self._held)

    def evictable_count(self) -> int:
        return len(self._lru)

    def clear(self) -> None:
        self._lru.clear()
        self._held.clear()

    def candidates(self, n: int) -> list[Hashable]:
        return list(islice(self._lru, n))

    def order(self) -> list[Hashable]:
        """Evictable keys, least recent first (for tests and inspection)."""
        return list(self._lru)
