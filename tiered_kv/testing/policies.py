"""Conformance tests for eviction policies, checked against a dict model and optional reference orders.

What every policy promises (see :class:`~tiered_kv.policies.EvictionPolicy`), checked here against a plain
``dict`` of ``key -> evictable`` that the suite keeps itself, never by asking the policy:

* ``key in policy``, ``len(policy)`` and ``evictable_count()`` agree with the model after every call;
* ``evict()`` returns an evictable key (never a held one, never one it does not hold, never one twice) and forgets
  it; it returns None exactly when nothing is evictable;
* ``remove(key)`` forgets the key (unknown keys are ignored); ``clear()`` forgets everything, history included;
* ``candidates(n)`` returns at most ``n`` distinct evictable keys and changes nothing (a twin policy that never
  sees the call evicts the same keys); a policy that declares ``exact_candidates`` returns exactly its next ``n``
  victims;
* with a ``reference`` (an independent implementation of the same order, e.g. :class:`LruReference`,
  :class:`ArcReference`), every victim and every candidate list equals the reference's;
* the policy drives a real :class:`~tiered_kv.pool.BlockPool`: blocks come back with the bytes they were
  registered with, and a pool that never evicts fills up with ``NotEnoughBlocksAvailable``.

Run it on your own policy::

    from tiered_kv.testing import EvictionPolicyTests, PolicySpec

    class TestMyPolicy(EvictionPolicyTests):
        spec = PolicySpec(MyPolicy)             # factory(capacity) -> policy; add exact_candidates=True etc.

or register it and run every registered policy (built-ins included)::

    register_eviction_policy("mine", MyPolicy)

    class TestRegistered(RegisteredPolicyTests):   # one run per name in available_policies()
        specs = {**BUILTIN_SPECS, "mine": PolicySpec(MyPolicy, exact_candidates=True)}

Needs pytest and hypothesis (``pip install tiered_kv[testing]``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Protocol

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from ..errors import NotEnoughBlocksAvailable
from ..policies import EvictionPolicy, PolicyFactory, available_policies, create_policy
from ._data import SMALL_MODEL, block_bytes, same, seq_hash

__all__ = [
    "ArcReference",
    "BUILTIN_SPECS",
    "EvictionPolicyTests",
    "LruReference",
    "PolicySpec",
    "ReferencePolicy",
    "RegisteredPolicyTests",
]


class ReferencePolicy(Protocol):
    """What the suite drives in lockstep with the policy under test (an independent model of its order)."""

    def insert(self, key: Hashable, evictable: bool) -> None: ...
    def touch(self, key: Hashable) -> None: ...
    def set_evictable(self, key: Hashable, evictable: bool) -> None: ...
    def set_evictable_as_victim(self, key: Hashable) -> None: ...
    def evict(self) -> Hashable | None: ...
    def remove(self, key: Hashable) -> None: ...
    def clear(self) -> None: ...
    def candidates(self, n: int) -> list[Hashable]: ...


@dataclass(frozen=True)
class PolicySpec:
    """A policy under test and what it declares beyond the base promises.

    Attributes:
        factory: ``factory(capacity) -> policy``.
        never_evicts: the policy never offers a victim (``evict()`` is always None, ``evictable_count()`` 0).
        exact_candidates: ``candidates(n)`` is exactly the next ``n`` keys ``evict()`` would return.
        reference: ``reference(capacity)`` builds an independent model of the exact eviction order; every victim
            and candidate list must equal it.
        deterministic: the same calls give the same victims (the twin check of ``candidates`` relies on it).
    """

    factory: PolicyFactory
    never_evicts: bool = False
    exact_candidates: bool = False
    reference: Callable[[int], ReferencePolicy] | None = None
    deterministic: bool = True


class LruReference:
    """Least recently used, written with timestamps (no OrderedDict): the order the built-in LRU promises.

    A key is "used" when it enters evictable, is touched while evictable, or becomes evictable again; a held key
    released as a victim goes before every other evictable key.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._clock = 0
        self._stamp: dict[Hashable, int] = {}  # evictable keys -> time of last use
        self._held: set[Hashable] = set()

    def _now(self) -> int:
        self._clock += 1
        return self._clock

    def insert(self, key: Hashable, evictable: bool) -> None:
        if evictable:
            self._stamp[key] = self._now()
        else:
            self._held.add(key)

    def touch(self, key: Hashable) -> None:
        if key in self._stamp:
            self._stamp[key] = self._now()

    def set_evictable(self, key: Hashable, evictable: bool) -> None:
        if evictable and key in self._held:
            self._held.discard(key)
            self._stamp[key] = self._now()
        elif not evictable and key in self._stamp:
            del self._stamp[key]
            self._held.add(key)

    def set_evictable_as_victim(self, key: Hashable) -> None:
        if key in self._held:
            self._held.discard(key)
            self._stamp[key] = min(self._stamp.values(), default=0) - 1

    def _order(self) -> list[Hashable]:
        return sorted(self._stamp, key=self._stamp.__getitem__)

    def evict(self) -> Hashable | None:
        order = self._order()
        if not order:
            return None
        del self._stamp[order[0]]
        return order[0]

    def remove(self, key: Hashable) -> None:
        self._stamp.pop(key, None)
        self._held.discard(key)

    def clear(self) -> None:
        self._stamp.clear()
        self._held.clear()

    def candidates(self, n: int) -> list[Hashable]:
        return self._order()[:n]


class ArcReference:
    """ARC (Megiddo & Modha) in the pool-driven form the built-in ARC documents, written with plain lists.

    ``T1``/``T2`` hold every cached key, held ones included (they count in ``|T1|``), least recent first;
    ``B1``/``B2`` are the ghosts. ``insert`` adapts ``p`` on a ghost hit (the key goes to T2) or trims the ghost
    lists per the paper's case IV (the key goes to T1); ``evict`` is REPLACE without the B2 tie-break: the least
    recent evictable key of T1 when ``|T1| > p`` (else of T2), of the other list when the chosen one has none,
    moved to its ghost list. A hit moves a key of T1 to T2's most recent end; a key that becomes evictable again
    goes to the most recent end of its list (to the least recent end when released as a victim).
    """

    def __init__(self, capacity: int, p_initial: float = 0.0) -> None:
        self.c = capacity
        self.p_initial = float(p_initial)
        self.p = self.p_initial
        self.t1: list[Hashable] = []
        self.t2: list[Hashable] = []
        self.b1: list[Hashable] = []
        self.b2: list[Hashable] = []
        self.held: set[Hashable] = set()

    def _list_of(self, key: Hashable) -> list[Hashable] | None:
        if key in self.t1:
            return self.t1
        if key in self.t2:
            return self.t2
        return None

    def insert(self, key: Hashable, evictable: bool) -> None:
        if key in self.b1:
            self.p = min(float(self.c), self.p + max(len(self.b2) / len(self.b1), 1.0))
            self.b1.remove(key)
            dest = self.t2
        elif key in self.b2:
            self.p = max(0.0, self.p - max(len(self.b1) / len(self.b2), 1.0))
            self.b2.remove(key)
            dest = self.t2
        else:
            if len(self.t1) + len(self.b1) >= self.c:
                if self.b1:
                    self.b1.pop(0)
            elif len(self.t1) + len(self.t2) + len(self.b1) + len(self.b2) >= 2 * self.c and self.b2:
                self.b2.pop(0)
            dest = self.t1
        dest.append(key)
        if not evictable:
            self.held.add(key)

    def touch(self, key: Hashable) -> None:
        lst = self._list_of(key)
        if lst is not None:
            lst.remove(key)
            self.t2.append(key)

    def set_evictable(self, key: Hashable, evictable: bool) -> None:
        lst = self._list_of(key)
        if lst is None:
            return
        if evictable and key in self.held:
            self.held.discard(key)
            lst.remove(key)
            lst.append(key)
        elif not evictable:
            self.held.add(key)

    def set_evictable_as_victim(self, key: Hashable) -> None:
        lst = self._list_of(key)
        if lst is not None and key in self.held:
            self.held.discard(key)
            lst.remove(key)
            lst.insert(0, key)

    def evict(self) -> Hashable | None:
        ev1 = [k for k in self.t1 if k not in self.held]
        ev2 = [k for k in self.t2 if k not in self.held]
        t1 = len(self.t1)
        prefer_t1 = t1 >= 1 and t1 > self.p
        if (prefer_t1 and ev1) or not ev2:
            if not ev1:
                return None
            self.t1.remove(ev1[0])
            self.b1.append(ev1[0])
            return ev1[0]
        self.t2.remove(ev2[0])
        self.b2.append(ev2[0])
        return ev2[0]

    def remove(self, key: Hashable) -> None:
        for lst in (self.t1, self.t2, self.b1, self.b2):
            if key in lst:
                lst.remove(key)
        self.held.discard(key)

    def clear(self) -> None:
        for lst in (self.t1, self.t2, self.b1, self.b2):
            lst.clear()
        self.held.clear()
        self.p = self.p_initial

    def candidates(self, n: int) -> list[Hashable]:
        twin = copy.deepcopy(self)
        out = []
        for _ in range(n):
            k = twin.evict()
            if k is None:
                break
            out.append(k)
        return out


#: What the built-in policies declare (the registry gives only factories).
BUILTIN_SPECS: dict[str, PolicySpec] = {
    "arc": PolicySpec(lambda c: create_policy("arc", c), exact_candidates=True, reference=ArcReference),
    "lru": PolicySpec(lambda c: create_policy("lru", c), exact_candidates=True, reference=LruReference),
    "none": PolicySpec(lambda c: create_policy("none", c), never_evicts=True),
}

CAPACITY = 5
#: Keys: twice the capacity and more, so that evicted keys come back (ARC's ghost hits).
KEYS: list[bytes] = [b"key-%02d" % i for i in range(3 * CAPACITY)]

#: Operation kinds and their weights: inserts weigh most, so that the policy is usually near full and evictions
#: choose among many entries; clear is rare.
_WEIGHTS = {
    "insert": 30, "touch": 10, "hold": 10, "release": 8, "release_as_victim": 4, "evict": 10, "remove": 5,
    "remove_unknown": 2, "candidates": 6, "take_candidates": 4, "clear": 1,
}
_KINDS = [k for k, w in _WEIGHTS.items() for _ in range(w)]
#: One operation: (kind, an index that picks among the keys the kind applies to, a flag). Small kinds shrink to
#: inserts.
_OPS = st.tuples(st.integers(0, len(_KINDS) - 1), st.integers(0, 3 * CAPACITY), st.booleans()).map(
    lambda t: (_KINDS[t[0]], t[1], t[2])
)


def _nth(keys: list[Hashable], i: int) -> Hashable | None:
    return keys[i % len(keys)] if keys else None


class _Driver:
    """Applies pool-like calls to the policy, a twin (never asked for candidates) and the reference, and checks
    each result against the dict model."""

    def __init__(self, spec: PolicySpec, capacity: int) -> None:
        self.spec = spec
        self.capacity = capacity
        self.policy = spec.factory(capacity)
        self.twin = spec.factory(capacity) if spec.deterministic else None
        self.ref = spec.reference(capacity) if spec.reference is not None else None
        self.model: dict[Hashable, bool] = {}  # key -> evictable

    def _all(self, method: str, *args: Any) -> None:
        getattr(self.policy, method)(*args)
        if self.twin is not None:
            getattr(self.twin, method)(*args)
        if self.ref is not None:
            getattr(self.ref, method)(*args)

    def evictable(self) -> list[Hashable]:
        return [k for k, e in self.model.items() if e]

    def insert(self, key: Hashable, evictable: bool) -> None:
        if key in self.model:
            return  # a pool inserts only new keys
        # The pool is full: it evicts first, or cannot take the key.
        if len(self.model) >= self.capacity and self.evict() is None:
            return
        self._all("insert", key, evictable)
        self.model[key] = evictable

    def touch(self, key: Hashable) -> None:
        if key in self.model:
            self._all("touch", key)

    def hold(self, key: Hashable) -> None:
        if self.model.get(key):
            self._all("set_evictable", key, False)
            self.model[key] = False

    def release(self, key: Hashable, as_victim: bool = False) -> None:
        if self.model.get(key) is False:
            if as_victim:
                self._all("set_evictable_as_victim", key)
            else:
                self._all("set_evictable", key, True)
            self.model[key] = True

    def evict(self) -> Hashable | None:
        victim = self.policy.evict()
        if self.twin is not None:
            twin_victim = self.twin.evict()
            assert twin_victim == victim, (
                f"two policies given the same calls evicted {victim!r} and {twin_victim!r} (candidates() is not "
                "free of side effects, or the policy is not deterministic)"
            )
        if self.spec.never_evicts or not self.evictable():
            assert victim is None, f"evict() returned {victim!r} with no evictable entry"
        else:
            assert victim is not None, f"evict() returned None with evictable entries {self.evictable()!r}"
            assert victim in self.model, f"evict() returned {victim!r}, which is not a cached entry"
            assert self.model[victim], f"evict() returned the held entry {victim!r}"
            del self.model[victim]
        if self.ref is not None:
            expected = self.ref.evict()
            if not self.spec.never_evicts:
                assert victim == expected, f"evict() returned {victim!r}; the reference order gives {expected!r}"
        return victim

    def remove(self, key: Hashable) -> None:
        self._all("remove", key)
        self.model.pop(key, None)

    def clear(self) -> None:
        self._all("clear")
        self.model.clear()

    def candidates(self, n: int) -> list[Hashable]:
        got = self.policy.candidates(n)
        assert isinstance(got, list), f"candidates() returned {type(got).__name__}, not a list"
        assert len(got) <= n, f"candidates({n}) returned {len(got)} keys"
        assert len(set(got)) == len(got), f"candidates({n}) repeats a key: {got!r}"
        for k in got:
            assert self.model.get(k), f"candidates({n}) offered {k!r}, which is not an evictable entry"
        if self.spec.exact_candidates:
            assert len(got) == min(n, len(self.evictable())), f"candidates({n}) gave {len(got)} keys"
        if self.ref is not None and self.spec.exact_candidates:
            assert got == self.ref.candidates(n), f"candidates({n}) = {got!r}; reference: {self.ref.candidates(n)!r}"
        return got

    def take_candidates(self, n: int) -> None:
        """``candidates(n)`` then ``n`` evictions: with ``exact_candidates`` the victims are the candidates."""
        got = self.candidates(n)
        victims = []
        for _ in range(n):
            v = self.evict()
            if v is None:
                break
            victims.append(v)
        if self.spec.exact_candidates:
            assert got == victims, f"candidates({n}) = {got!r} but evict() took {victims!r}"

    def apply(self, op: tuple[Any, ...]) -> None:
        """Run one generated operation; its index picks among the keys the operation makes sense for."""
        name = op[0]
        if name == "insert":
            key = _nth([k for k in KEYS if k not in self.model], op[1])
            if key is not None:
                self.insert(key, op[2])
        elif name == "remove_unknown":
            self.remove(b"unknown-%d" % op[1])
        elif name == "clear":
            self.clear()
        elif name == "evict":
            self.evict()
        elif name in ("candidates", "take_candidates"):
            getattr(self, name)(op[1] % (self.capacity + 2) + (name == "take_candidates"))
        else:
            if name in ("touch", "remove"):
                keys = list(self.model)
            elif name == "hold":
                keys = self.evictable()
            else:
                keys = [k for k, e in self.model.items() if not e]
            key = _nth(keys, op[1])
            if key is not None:
                if name == "release_as_victim":
                    self.release(key, as_victim=True)
                else:
                    getattr(self, name)(key)
        self.check()

    def check(self) -> None:
        p = self.policy
        assert len(p) == len(self.model), f"len(policy) = {len(p)}, model holds {len(self.model)}"
        for k in KEYS:
            assert (k in p) == (k in self.model), f"{k!r} in policy is {k in p}, model says {k in self.model}"
        want = 0 if self.spec.never_evicts else len(self.evictable())
        assert p.evictable_count() == want, f"evictable_count() = {p.evictable_count()}, expected {want}"


class EvictionPolicyTests:
    """Conformance tests for one eviction policy; subclass and set :attr:`spec` (or override the ``policy_spec``
    fixture). See the module docstring."""

    spec: ClassVar[PolicySpec | None] = None
    capacity: ClassVar[int] = CAPACITY
    #: Hypothesis examples of the random-operations test.
    max_examples: ClassVar[int] = 25
    #: More ``hypothesis.settings`` arguments for the random-operations test (e.g. ``phases``).
    hypothesis_settings: ClassVar[dict[str, Any]] = {}

    @pytest.fixture
    def policy_spec(self) -> PolicySpec:
        """The policy under test; the default returns :attr:`spec`."""
        if self.spec is None:
            raise NotImplementedError(f"{type(self).__name__}: set spec = PolicySpec(...) or override policy_spec")
        return self.spec

    def driver(self, spec: PolicySpec) -> _Driver:
        return _Driver(spec, self.capacity)

    def test_starts_empty(self, policy_spec: PolicySpec) -> None:
        policy = policy_spec.factory(self.capacity)
        assert isinstance(policy, EvictionPolicy) or all(
            callable(getattr(policy, m, None)) for m in ("insert", "touch", "set_evictable", "evict", "remove")
        )
        assert policy.capacity == self.capacity
        assert len(policy) == 0 and policy.evictable_count() == 0
        assert policy.evict() is None
        assert policy.candidates(3) == []
        policy.remove(b"never-inserted")  # unknown keys are ignored
        assert len(policy) == 0

    def test_evicts_each_evictable_entry_once_then_none(self, policy_spec: PolicySpec) -> None:
        d = self.driver(policy_spec)
        for k in KEYS[: self.capacity]:
            d.insert(k, True)
        d.check()
        victims = [d.evict() for _ in range(self.capacity)]
        d.check()
        if not policy_spec.never_evicts:
            assert sorted(victims) == sorted(KEYS[: self.capacity])  # type: ignore[type-var]
        assert d.evict() is None

    def test_held_entries_are_never_evicted(self, policy_spec: PolicySpec) -> None:
        d = self.driver(policy_spec)
        for i, k in enumerate(KEYS[: self.capacity]):
            d.insert(k, i % 2 == 0)  # inserted held: a registered block its registrant still holds
        d.hold(KEYS[2])
        d.check()
        while d.evict() is not None:
            d.check()
        kept = set(KEYS[: self.capacity]) if policy_spec.never_evicts else {KEYS[1], KEYS[2], KEYS[3]}
        assert set(d.model) == kept
        d.release(KEYS[2])
        d.check()
        if not policy_spec.never_evicts:
            assert d.evict() == KEYS[2]
        d.check()

    def test_remove_forgets_held_and_evictable_entries(self, policy_spec: PolicySpec) -> None:
        d = self.driver(policy_spec)
        d.insert(KEYS[0], True)
        d.insert(KEYS[1], False)
        d.insert(KEYS[2], True)
        for k in (KEYS[0], KEYS[1], KEYS[9]):
            d.remove(k)
            d.check()
        if not policy_spec.never_evicts:
            assert d.evict() == KEYS[2]
        assert d.evict() is None
        d.check()

    def test_clear_forgets_history(self, policy_spec: PolicySpec) -> None:
        """After ``clear()`` the policy decides as a fresh one does (ARC's ghosts and ``p`` included)."""
        used = self.driver(policy_spec)
        for i in range(4 * self.capacity):
            used.insert(KEYS[i % len(KEYS)], True)
            if i % 3 == 0:
                used.touch(KEYS[i % len(KEYS)])
        used.clear()
        used.check()
        fresh = self.driver(policy_spec)
        for d in (used, fresh):
            for k in KEYS[: self.capacity]:
                d.insert(k, True)
            d.touch(KEYS[1])
            d.touch(KEYS[3])
            for k in KEYS[self.capacity : 2 * self.capacity]:
                d.insert(k, True)
            d.check()
        victims_used = [used.evict() for _ in range(self.capacity)]
        victims_fresh = [fresh.evict() for _ in range(self.capacity)]
        if policy_spec.deterministic:
            assert victims_used == victims_fresh

    def test_random_operations_against_model(self, policy_spec: PolicySpec) -> None:
        """Hypothesis: random pool-like call sequences, every result checked against the model."""

        # An inner test: one Hypothesis test per suite run, so subclasses and fixtures mix freely with it.
        @settings(max_examples=self.max_examples, deadline=None, report_multiple_bugs=False, **self.hypothesis_settings)
        @given(ops=st.lists(_OPS, min_size=20, max_size=100))
        def run(ops: list[tuple[Any, ...]]) -> None:
            d = self.driver(policy_spec)
            for op in ops:
                d.apply(op)

        run()

    def test_batch_forms_match_the_single_forms(self, policy_spec: PolicySpec) -> None:
        """Hypothesis: ``insert_many``, ``hit_many``, ``set_evictable_many``, ``touch_many`` and ``evict_many`` leave
        a policy as the single forms do (the pool calls the batch forms): same entries, same victims."""

        @settings(max_examples=self.max_examples, deadline=None, report_multiple_bugs=False, **self.hypothesis_settings)
        @given(batches=st.lists(st.tuples(st.integers(0, 4), st.lists(st.integers(0, len(KEYS) - 1), max_size=8)),
                                min_size=5, max_size=40))
        def run(batches: list[tuple[int, list[int]]]) -> None:
            fast, slow = policy_spec.factory(self.capacity), policy_spec.factory(self.capacity)
            model: dict[Hashable, bool] = {}  # key -> evictable
            for kind, picks in batches:
                if kind == 0:  # new entries, held as the pool inserts them (or evictable, on odd draws)
                    keys = list(dict.fromkeys(k for i in picks if (k := KEYS[i]) not in model))
                    evictable = len(picks) % 2 == 1
                    fast.insert_many(keys, evictable)
                    for k in keys:
                        slow.insert(k, evictable)
                        model[k] = evictable
                elif kind == 1:  # hits on present entries (a key may repeat in a request)
                    keys = [KEYS[i] for i in picks if KEYS[i] in model]
                    newly = list(dict.fromkeys(k for k in keys if model[k]))
                    fast.hit_many(keys, newly)
                    for k in newly:
                        slow.set_evictable(k, False)
                        model[k] = False
                    for k in keys:
                        slow.touch(k)
                elif kind == 2:  # the last releases of held entries
                    keys = list(dict.fromkeys(KEYS[i] for i in picks if model.get(KEYS[i]) is False))
                    fast.set_evictable_many(keys, True)
                    for k in keys:
                        slow.set_evictable(k, True)
                        model[k] = True
                elif kind == 3:
                    keys = [KEYS[i] for i in picks if KEYS[i] in model]
                    fast.touch_many(keys)
                    for k in keys:
                        slow.touch(k)
                else:
                    got = fast.evict_many(len(picks))
                    assert len(set(got)) == len(got) and all(model.get(k) is True for k in got), got
                    if policy_spec.deterministic:
                        want = [v for _ in range(len(picks)) if (v := slow.evict()) is not None]
                        assert got == want, f"evict_many({len(picks)}) = {got!r}; evict() x{len(picks)}: {want!r}"
                    else:  # the victims may differ: keep the twin in step instead
                        for gone in got:
                            slow.remove(gone)
                    for gone in got:
                        del model[gone]
                assert len(fast) == len(slow) and fast.evictable_count() == slow.evictable_count()
                assert all((k in fast) == (k in slow) for k in KEYS)
            if policy_spec.deterministic:
                rest = [v for _ in range(len(KEYS)) if (v := slow.evict()) is not None]
                assert fast.evict_many(len(KEYS)) == rest

        run()

    def test_drives_a_real_pool(self, policy_spec: PolicySpec) -> None:
        """Inside a :class:`~tiered_kv.pool.BlockPool` the policy's victims free slots and bytes stay right."""
        from ..pool import BlockPool
        from ..storage.memory import TensorArena

        model = SMALL_MODEL
        pool = BlockPool(
            "host", TensorArena("host", model, self.capacity, "fully_contiguous", "cpu"),
            policy_spec.factory(self.capacity), 32,
        )
        registered: list[bytes] = []
        for i in range(3 * self.capacity):
            h = seq_hash("pool", i)
            try:
                (blk,) = pool.allocate_blocks(1)
            except NotEnoughBlocksAvailable:
                assert policy_spec.never_evicts and len(registered) == self.capacity
                break
            data = block_bytes(h, model)
            for layer in range(model.num_layers):
                for outer in range(model.outer_dim):
                    blk.layer_view(layer, outer).copy_(data[layer, outer])
            pool.release_blocks(pool.register_blocks([blk], [h]))
            registered.append(h)
            if i % 2:
                hits = pool.match_sequence_hashes([registered[-2]])  # a hit on the previous block
                pool.release_blocks(hits)
        present = [h for h in registered if h in pool]
        assert len(present) == min(self.capacity, len(registered))
        for h in present:
            (hit,) = pool.match_sequence_hashes([h])
            got = torch.stack([
                torch.stack([hit.layer_view(layer, outer) for outer in range(model.outer_dim)])
                for layer in range(model.num_layers)
            ])
            assert same(got, block_bytes(h, model)), f"block {h.hex()} came back with other bytes"
            hit.release()


class RegisteredPolicyTests(EvictionPolicyTests):
    """:class:`EvictionPolicyTests` once per name in ``available_policies()`` at collection time.

    Names missing from :attr:`specs` are checked against the base promises only.
    """

    specs: ClassVar[dict[str, PolicySpec]] = BUILTIN_SPECS

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "policy_name" in metafunc.fixturenames:
            metafunc.parametrize("policy_name", available_policies())

    @pytest.fixture
    def policy_spec(self, policy_name: str) -> PolicySpec:
        def factory(capacity: int) -> EvictionPolicy:
            return create_policy(policy_name, capacity)

        spec = self.specs.get(policy_name)
        return replace(spec, factory=factory) if spec is not None else PolicySpec(factory)
