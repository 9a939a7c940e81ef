"""Eviction policies: ARC against the paper's behaviour, LRU, the held-entry rules, the registry."""

from __future__ import annotations

import random

import pytest

from tiered_kv import ConfigError, register_eviction_policy
from tiered_kv.policies import ARCPolicy, LRUPolicy, available_policies, create_policy

TEXTBOOK = (
    list(range(20))
    + list(range(11, 15))
    + list(range(20))
    + list(range(11, 40))
    + [39, 38, 37, 36, 35, 34, 33, 32, 16, 17, 11, 41]
)


def test_arc_textbook_sequence_ends_with_t1_41() -> None:
    arc = ARCPolicy(10)
    for k in TEXTBOOK:
        arc.request(k)
    lists = arc.lists()
    assert lists["T1"] == [41]
    assert lists["T2"] == [37, 36, 35, 34, 33, 32, 16, 17, 11]
    assert len(arc) == 10


def _check_arc_invariants(arc: ARCPolicy) -> None:
    c = arc.capacity
    t1, t2 = arc.t1_size(), arc.t2_size()
    b1, b2 = len(arc.lists()["B1"]), len(arc.lists()["B2"])
    assert t1 + t2 <= c
    assert t1 + b1 <= c
    assert t1 + t2 + b1 + b2 <= 2 * c
    assert 0 <= arc.p <= c


def test_arc_invariants_under_random_requests() -> None:
    rng = random.Random(7)
    arc = ARCPolicy(32)
    for _ in range(20000):
        key = int(rng.paretovariate(1.2) * 3) if rng.random() < 0.7 else rng.randrange(500)
        arc.request(key)
        _check_arc_invariants(arc)


def test_arc_hit_on_t1_moves_to_t2() -> None:
    arc = ARCPolicy(4)
    arc.insert("a", True)
    assert arc.lists()["T1"] == ["a"]
    arc.touch("a")
    assert arc.lists()["T2"] == ["a"] and arc.lists()["T1"] == []


def test_arc_ghost_hit_adapts_p_and_goes_to_t2() -> None:
    arc = ARCPolicy(2)
    arc.insert("a", True)
    arc.insert("b", True)
    assert arc.evict() == "a"  # T1 > p=0: T1's LRU goes to B1
    assert arc.lists()["B1"] == ["a"]
    arc.insert("a", True)
    assert arc.p == 1.0
    assert "a" in arc.lists()["T2"]


def test_held_entries_are_never_evicted_and_counted() -> None:
    for policy in (ARCPolicy(4), LRUPolicy(4)):
        for k in "abcd":
            policy.insert(k, True)
        policy.set_evictable("a", False)
        policy.set_evictable("b", False)
        assert policy.evictable_count() == 2
        assert len(policy) == 4
        victims = [policy.evict(), policy.evict()]
        assert sorted(victims) == ["c", "d"]  # type: ignore[type-var]
        assert policy.evict() is None
        policy.set_evictable("a", True)
        assert policy.evict() == "a"


def test_arc_held_hit_moves_between_lists_and_keeps_sizes() -> None:
    arc = ARCPolicy(4)
    arc.insert("a", False)
    assert arc.t1_size() == 1 and arc.evictable_count() == 0
    arc.touch("a")
    assert arc.t1_size() == 0 and arc.t2_size() == 1
    arc.set_evictable("a", True)
    assert arc.lists()["T2"] == ["a"]


def test_arc_replace_falls_back_to_other_list_when_preferred_is_all_held() -> None:
    arc = ARCPolicy(3)
    arc.insert("x", True)
    arc.touch("x")  # T2 = [x]
    arc.insert("a", False)
    arc.insert("b", False)  # T1 = held a, b; |T1| = 2 > p = 0 prefers T1
    assert arc.evict() == "x"
    assert arc.lists()["B2"] == ["x"]


def test_remove_forgets_without_ghost() -> None:
    arc = ARCPolicy(4)
    arc.insert("a", True)
    arc.insert("b", False)
    arc.remove("a")
    arc.remove("b")
    arc.remove("zzz")
    assert len(arc) == 0 and arc.lists()["B1"] == []


def test_lru_order() -> None:
    lru = LRUPolicy(3)
    for k in "abc":
        lru.insert(k, True)
    lru.touch("a")
    assert lru.evict() == "b"
    lru.set_evictable("c", False)
    lru.set_evictable("c", True)  # re-enters as most recent
    assert lru.order() == ["a", "c"]


def _hit_rate(policy_name: str, trace: list[int], capacity: int) -> float:
    """Simulate a cache that evicts through the pool-facing interface (evict, then insert)."""
    policy = create_policy(policy_name, capacity)
    hits = 0
    for k in trace:
        if k in policy:
            policy.touch(k)
            hits += 1
            continue
        if len(policy) >= capacity:
            assert policy.evict() is not None
        policy.insert(k, True)
    return hits / len(trace)


def test_arc_beats_lru_on_scan_polluted_working_set() -> None:
    rng = random.Random(1)
    hot = list(range(60))
    trace: list[int] = []
    scan_key = 10_000
    for _ in range(300):
        trace.extend(rng.choice(hot) for _ in range(40))
        trace.extend(range(scan_key, scan_key + 50))  # one-time scan: never seen again
        scan_key += 50
    arc = _hit_rate("arc", trace, 100)
    lru = _hit_rate("lru", trace, 100)
    assert arc > lru * 1.5, (arc, lru)


def test_registry() -> None:
    assert {"arc", "lru"} <= set(available_policies())
    register_eviction_policy("my-lru", LRUPolicy)
    assert isinstance(create_policy("my-lru", 3), LRUPolicy)
    with pytest.raises(ConfigError, match="eviction"):
        create_policy("nope", 3)
    with pytest.raises(ConfigError, match="factory"):
        register_eviction_policy("bad", 3)  # type: ignore[arg-type]
    register_eviction_policy("broken", lambda cap: object())  # type: ignore[arg-type,return-value]
    with pytest.raises(ConfigError, match="without"):
        create_policy("broken", 3)
