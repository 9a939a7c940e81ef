"""The "none" policy: a pool that never evicts (seed 002's ``enable_eviction=False``).

Cached blocks stay until they are invalidated or the pool is reset; an allocation gets only free slots, and fails
with ``NotEnoughBlocksAvailable`` once every slot holds a block. Nothing is demoted to lower tiers, since demotion
happens on eviction.
"""

from __future__ import annotations

from collections.abc import Hashable

from .base import EvictionPolicy

__all__ = ["NoEvictionPolicy"]


class NoEvictionPolicy(EvictionPolicy):
    """Tracks the cached keys and never offers a victim."""

    __slots__ = ("_keys", "capacity")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._keys: set[Hashable] = set()

    def insert(self, key: Hashable, evictable: bool) -> None:
        self._keys.add(key)

    def touch(self, key: Hashable) -> None:
        return None

    def set_evictable(self, key: Hashable, evictable: bool) -> None:
        return None

    def evict(self) -> Hashable | None:
        return None

    def remove(self, key: Hashable) -> None:
        self._keys.discard(key)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def evictable_count(self) -> int:
        return 0

    def clear(self) -> None:
        self._keys.clear()
