"""The eviction-policy interface and the registry that maps a name to a policy factory.

A policy orders the *cached* blocks of one pool (registered blocks, keyed by sequence hash) and picks eviction
victims. It never touches storage and knows nothing about slots or tensors. The pool tells it:

* ``insert(key, evictable)`` — a new hash entered the cache (a miss that was filled);
* ``touch(key)`` — a hit on a cached hash;
* ``set_evictable(key, flag)`` — the block became held (referenced or pinned) or free to evict again;
* ``evict()`` — pick one evictable victim, forget it as a cached entry and return its key (``None`` if there is none);
* ``remove(key)`` — the pool dropped the entry for another reason (reset, corruption); no ghost is kept.

The pool calls the batch forms (``insert_many``, ``touch_many``, ``set_evictable_many``, ``hit_many``,
``evict_many``) once per call of its own; their defaults loop over the single forms, so a policy only overrides
them to be faster. A batch of hits reaches the policy as ``set_evictable(key, False)`` for each key that becomes
held, then ``touch(key)`` for each key (not interleaved per key).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from ..errors import ConfigError

__all__ = ["EvictionPolicy", "PolicyFactory", "register_eviction_policy", "available_policies", "create_policy"]


class EvictionPolicy(ABC):
    """Orders cached entries and chooses victims among the evictable ones."""

    capacity: int

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # A subclass that overrides a single form (say LRUPolicy.evict) without its batch form would otherwise
        # inherit a fast batch form that bypasses the override: it gets the default loop over the single form.
        super().__init_subclass__(**kwargs)
        for batch, singles in _BATCH_OF.items():
            if batch not in cls.__dict__ and any(s in cls.__dict__ for s in singles):
                setattr(cls, batch, EvictionPolicy.__dict__[batch])

    @abstractmethod
    def insert(self, key: Hashable, evictable: bool) -> None:
        """Add a new cached entry (a miss that has been filled)."""

    @abstractmethod
    def touch(self, key: Hashable) -> None:
        """Record a hit on a cached entry."""

    @abstractmethod
    def set_evictable(self, key: Hashable, evictable: bool) -> None:
        """Mark a cached entry as held (never returned by :meth:`evict`) or evictable again."""

    def set_evictable_as_victim(self, key: Hashable) -> None:
        """Make a held entry evictable again without counting the hold as a use: it goes back among the next
        victims (a mover held it to copy it down). Policies without an order may keep the default."""
        self.set_evictable(key, True)

    @abstractmethod
    def evict(self) -> Hashable | None:
        """Choose an evictable victim, forget it as a cached entry and return its key, or None."""

    @abstractmethod
    def remove(self, key: Hashable) -> None:
        """Forget an entry entirely (no history is kept); unknown keys are ignored."""

    @abstractmethod
    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is a cached entry (held or evictable)."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of cached entries (held and evictable)."""

    @abstractmethod
    def evictable_count(self) -> int:
        """Number of entries :meth:`evict` could return."""

    @abstractmethod
    def clear(self) -> None:
        """Forget everything, history included."""

    # --- batch forms: one call per pool operation; each is exactly the loop of its single form -----------------
    def insert_many(self, keys: Sequence[Hashable], evictable: bool) -> None:
        """``insert(key, evictable)`` for each key, in order."""
        for key in keys:
            self.insert(key, evictable)

    def touch_many(self, keys: Sequence[Hashable]) -> None:
        """``touch(key)`` for each key, in order."""
        for key in keys:
            self.touch(key)

    def set_evictable_many(self, keys: Sequence[Hashable], evictable: bool) -> None:
        """``set_evictable(key, evictable)`` for each key, in order."""
        for key in keys:
            self.set_evictable(key, evictable)

    def hit_many(self, keys: Sequence[Hashable], newly_held: Sequence[Hashable]) -> None:
        """A hit on each of ``keys``, which the pool now holds; ``newly_held``: those of them that were evictable
        until now. The same as ``set_evictable_many(newly_held, False)`` then ``touch_many(keys)`` (the default),
        in one pass where a policy can."""
        if newly_held:
            self.set_evictable_many(newly_held, False)
        self.touch_many(keys)

    def evict_many(self, n: int) -> list[Hashable]:
        """Up to ``n`` victims, as ``n`` calls of :meth:`evict` would take them (stops at the first None)."""
        out: list[Hashable] = []
        for _ in range(n):
            key = self.evict()
            if key is None:
                break
            out.append(key)
        return out

    def candidates(self, n: int) -> list[Hashable]:
        """Up to ``n`` evictable keys likely to be evicted soon (for write-back ahead of need); no state change.

        The default gives none, which only disables cleaning ahead of need for a policy that does not say.
        """
        return []


#: Each batch form and the single forms it stands for.
_BATCH_OF = {
    "insert_many": ("insert",),
    "touch_many": ("touch",),
    "set_evictable_many": ("set_evictable",),
    "hit_many": ("set_evictable", "touch"),
    "evict_many": ("evict",),
}

PolicyFactory = Callable[[int], EvictionPolicy]

_REGISTRY: dict[str, PolicyFactory] = {}
_REGISTRY_LOCK = threading.Lock()


def register_eviction_policy(name: str, factory: PolicyFactory) -> None:
    """Make ``eviction=name`` available in :class:`~tiered_kv.config.KvBlockManagerConfig`.

    Args:
        name: the policy name; re-registering a name replaces its factory.
        factory: ``factory(capacity) -> policy`` with the :class:`EvictionPolicy` interface, or an object with a
            ``should_evict(block) -> bool`` method (seed 001's policy trait), which becomes a
            :class:`~tiered_kv.policies.predicate.PredicatePolicy` over that predicate.

    Raises:
        ConfigError: the name is not a non-empty str or the factory is neither callable nor has ``should_evict``.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError("name", name, "must be a non-empty str")
    should_evict = getattr(factory, "should_evict", None)
    if not callable(factory) and callable(should_evict):
        from .predicate import PredicatePolicy

        factory = PredicatePolicy.factory(should_evict)
    if not callable(factory):
        raise ConfigError(
            "factory", factory, "must be callable as factory(capacity) -> policy, or have a should_evict(block) method"
        )
    with _REGISTRY_LOCK:
        _REGISTRY[name] = factory


def available_policies() -> list[str]:
    """Names accepted by ``KvBlockManagerConfig(eviction=...)``."""
    with _REGISTRY_LOCK:
        return sorted(_REGISTRY)


def create_policy(name: str, capacity: int) -> EvictionPolicy:
    """Build the policy registered under ``name`` for a pool of ``capacity`` blocks."""
    with _REGISTRY_LOCK:
        factory = _REGISTRY.get(name)
    if factory is None:
        raise ConfigError("eviction", name, f"unknown policy; registered: {', '.join(available_policies())}")
    policy = factory(capacity)
    missing = [m for m in ("insert", "touch", "set_evictable", "evict", "remove", "evictable_count", "clear")
               if not callable(getattr(policy, m, None))]
    if missing:
        raise ConfigError("eviction", name, f"factory returned {type(policy).__name__} without {', '.join(missing)}")
    return policy
