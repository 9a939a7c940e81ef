"""Every registered eviction policy, and one written the way a user would, through ``EvictionPolicyTests``."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from itertools import islice
from typing import Any, ClassVar

import pytest
from hypothesis import Phase

from tiered_kv import KvBlockManager, KvBlockManagerConfig, LayoutConfig, register_eviction_policy
from tiered_kv.policies import EvictionPolicy, LRUPolicy, predicate_policy
from tiered_kv.testing import (
    BUILTIN_SPECS,
    ArcReference,
    EvictionPolicyTests,
    LruReference,
    PolicySpec,
    RegisteredPolicyTests,
)
from tiered_kv.testing._data import SMALL_MODEL, block_bytes, hashes


class FifoPolicy(EvictionPolicy):
    """First in, first out: what a user writes from the docs (hits change nothing; held entries wait aside)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._queue: OrderedDict[Hashable, bool] = OrderedDict()  # key -> evictable, in insertion order

    def insert(self, key: Hashable, evictable: bool) -> None:
        self._queue[key] = evictable

    def touch(self, key: Hashable) -> None:
        pass

    def set_evictable(self, key: Hashable, evictable: bool) -> None:
        if key in self._queue:
            self._queue[key] = evictable

    def evict(self) -> Hashable | None:
        victim = next((k for k, ev in self._queue.items() if ev), None)
        if victim is not None:
            del self._queue[victim]
        return victim

    def remove(self, key: Hashable) -> None:
        self._queue.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._queue

    def __len__(self) -> int:
        return len(self._queue)

    def evictable_count(self) -> int:
        return sum(self._queue.values())

    def clear(self) -> None:
        self._queue.clear()

    def candidates(self, n: int) -> list[Hashable]:
        return list(islice((k for k, ev in self._queue.items() if ev), n))


class FifoReference:
    """FIFO as a plain list, for the suite's reference-order check."""

    def __init__(self, capacity: int) -> None:
        self.order: list[Hashable] = []
        self.held: set[Hashable] = set()

    def insert(self, key: Hashable, evictable: bool) -> None:
        self.order.append(key)
        if not evictable:
            self.held.add(key)

    def touch(self, key: Hashable) -> None:
        pass

    def set_evictable(self, key: Hashable, evictable: bool) -> None:
        (self.held.discard if evictable else self.held.add)(key)

    def set_evictable_as_victim(self, key: Hashable) -> None:
        self.held.discard(key)

    def candidates(self, n: int) -> list[Hashable]:
        return [k for k in self.order if k not in self.held][:n]

    def evict(self) -> Hashable | None:
        c = self.candidates(1)
        if c:
            self.order.remove(c[0])
        return c[0] if c else None

    def remove(self, key: Hashable) -> None:
        if key in self.order:
            self.order.remove(key)
        self.held.discard(key)

    def clear(self) -> None:
        self.order.clear()
        self.held.clear()


# Registered at import, before collection: RegisteredPolicyTests below runs it with the built-ins.
register_eviction_policy("conformance-fifo", FifoPolicy)
FIFO_SPEC = PolicySpec(FifoPolicy, exact_candidates=True, reference=FifoReference)


class TestRegisteredPolicies(RegisteredPolicyTests):
    specs: ClassVar[dict[str, PolicySpec]] = {**BUILTIN_SPECS, "conformance-fifo": FIFO_SPEC}


class TestUserFifoPolicy(EvictionPolicyTests):
    spec = FIFO_SPEC


class TestPredicatePolicy(EvictionPolicyTests):
    """Seed 001's predicate form (not registered by default): victims the predicate approves first."""

    spec = PolicySpec(predicate_policy(lambda meta: meta.access_count < 2))


def test_predicate_policy_approving_all_is_lru() -> None:
    """With a predicate that approves every block, the predicate policy must decide exactly as LRU does."""
    spec = PolicySpec(predicate_policy(lambda meta: True), exact_candidates=True, reference=LruReference)
    _QuickFifoSuite().test_random_operations_against_model(policy_spec=spec)


class _QuickFifoSuite(EvictionPolicyTests):
    # Report the first failure found, unshrunk: shrinking is what a user wants, not this test.
    hypothesis_settings: ClassVar[dict[str, Any]] = {
        "phases": [Phase.explicit, Phase.reuse, Phase.generate],
        "database": None,
    }


def test_arc_reference_tells_arc_from_lru() -> None:
    """The ARC reference is no tautology: LRU checked against it fails."""
    spec = PolicySpec(LRUPolicy, exact_candidates=True, reference=ArcReference)
    with pytest.raises(AssertionError, match="reference"):
        _QuickFifoSuite().test_random_operations_against_model(policy_spec=spec)


def test_user_policy_runs_a_manager() -> None:
    cfg = KvBlockManagerConfig(
        model=SMALL_MODEL, host=LayoutConfig(num_blocks=4), eviction="conformance-fifo", device_type="cpu"
    )
    hs = hashes("fifo-bm", 6)
    with KvBlockManager(cfg) as bm:
        pool = bm.host()
        assert pool is not None
        for h in hs:
            (blk,) = pool.allocate_blocks(1)
            for layer in range(SMALL_MODEL.num_layers):
                for outer in range(SMALL_MODEL.outer_dim):
                    blk.layer_view(layer, outer).copy_(block_bytes(h, SMALL_MODEL)[layer, outer])
            pool.release_blocks(pool.register_blocks([blk], [h]))
        # FIFO: the two oldest left, the four newest stay.
        assert [h in pool for h in hs] == [False, False, True, True, True, True]


# --- the suite catches broken policies ----------------------------------------------------------------------------
class EvictsHeld(FifoPolicy):
    """Ignores holds: evicts blocks someone still references."""

    def set_evictable(self, key: Hashable, evictable: bool) -> None:
        pass


class CountsWrong(FifoPolicy):
    """Counts held entries as evictable."""

    def evictable_count(self) -> int:
        return len(self._queue)


class RemoveKeepsEntry(FifoPolicy):
    """Forgets to forget: ``remove`` of an evictable entry leaves it in place."""

    def remove(self, key: Hashable) -> None:
        if not self._queue.get(key):
            self._queue.pop(key, None)


class CandidatesConsume(FifoPolicy):
    """``candidates`` evicts (a side effect the twin check sees)."""

    def candidates(self, n: int) -> list[Hashable]:
        out = super().candidates(n)
        if out:
            self._queue.move_to_end(out[0])
        return out


class LifoClaimingFifo(FifoPolicy):
    """Evicts newest first while claiming FIFO order (the reference catches it)."""

    def evict(self) -> Hashable | None:
        victim = next((k for k, ev in reversed(self._queue.items()) if ev), None)
        if victim is not None:
            del self._queue[victim]
        return victim


@pytest.mark.parametrize(
    ("broken", "test"),
    [
        (EvictsHeld, "test_held_entries_are_never_evicted"),
        (EvictsHeld, "test_random_operations_against_model"),
        (CountsWrong, "test_random_operations_against_model"),
        (RemoveKeepsEntry, "test_remove_forgets_held_and_evictable_entries"),
        (RemoveKeepsEntry, "test_random_operations_against_model"),
        (CandidatesConsume, "test_random_operations_against_model"),
        (LifoClaimingFifo, "test_random_operations_against_model"),
    ],
)
def test_suite_catches_broken_policies(broken: type[FifoPolicy], test: str) -> None:
    suite = _QuickFifoSuite()
    spec = PolicySpec(broken, exact_candidates=True, reference=FifoReference)
    method: Any = getattr(suite, test)
    with pytest.raises(AssertionError):
        method(policy_spec=spec)
