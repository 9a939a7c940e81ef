"""Adaptive Replacement Cache (Megiddo & Modha, FAST 2003).

The cache directory is the paper's: ``T1`` (entries seen once recently), ``T2`` (seen at least twice), the ghost
lists ``B1``/``B2`` (keys recently evicted from T1/T2, no data) and the adaptive target ``p`` for the size of T1.
Ghost lists are bounded as in the paper: ``|T1|+|B1| <= c`` and ``|T1|+|T2|+|B1|+|B2| <= 2c``.

How held blocks are handled. A pool cannot evict a block that is referenced or pinned, but ARC must still count it
(it occupies a slot and was seen once or twice). Each of T1 and T2 is therefore split into an ordered list of
evictable entries and a counter of held ones: ``|T1| = len(T1 evictable) + held in T1``. Every size comparison
(REPLACE's ``|T1| > p``, the ghost bounds) uses the full sizes, so the invariants are the paper's. REPLACE takes
the least recent *evictable* entry of the list the paper chooses; if that list has none, it takes one from the
other list (the paper's choice is impossible there, and the other list is what LRU order would give). A held entry
that becomes evictable re-enters its list at the most recent end, since its holder has just used it; a hit on a
held entry moves it from T1 to T2 as any hit does. All operations are O(1).

Two entry points. The pool drives :meth:`insert` / :meth:`touch` / :meth:`evict` separately, because it evicts
when it needs a slot (at allocation) and learns the new key only later (at registration); ``p`` is adapted at
insert time, when the ghost hit is known, and REPLACE runs without the B2 tie-break hint. :meth:`request` runs
the paper's algorithm for one reference exactly as published (adapt, REPLACE with the tie-break, insert), for
simulations and for the textbook tests.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

from .base import EvictionPolicy

__all__ = ["ARCPolicy"]

_T1 = 1
_T2 = 2


class ARCPolicy(EvictionPolicy):
    """ARC over the cached entries of one pool of ``capacity`` blocks.

    Args:
        capacity: the pool's number of blocks (``c`` in the paper).
        p_initial: the starting target size of T1 (the paper starts at 0); in ``[0, capacity]``. :meth:`clear`
            returns ``p`` to it.
    """

    __slots__ = ("_b1", "_b2", "_held", "_held1", "_held2", "_t1", "_t2", "capacity", "p", "p_initial")

    def __init__(self, capacity: int, p_initial: float = 0.0) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
            raise ValueError(f"capacity must be an int > 0, got {capacity!r}")
        if (isinstance(p_initial, bool) or not isinstance(p_initial, (int, float))
                or not 0 <= p_initial <= capacity):
            raise ValueError(f"p_initial must be a number in [0, capacity={capacity}], got {p_initial!r}")
        self.capacity = capacity
        self.p_initial = float(p_initial)
        self.p = self.p_initial
        self._t1: OrderedDict[Hashable, None] = OrderedDict()
        self._t2: OrderedDict[Hashable, None] = OrderedDict()
        self._b1: OrderedDict[Hashable, None] = OrderedDict()
        self._b2: OrderedDict[Hashable, None] = OrderedDict()
        self._held: dict[Hashable, int] = {}
        self._held1 = 0
        self._held2 = 0

    # --- sizes -----------------------------------------------------------------------------------------------
    def t1_size(self) -> int:
        """|T1|, held entries included."""
        return len(self._t1) + self._held1

    def t2_size(self) -> int:
        """|T2|, held entries included."""
        return len(self._t2) + self._held2

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2) + len(self._held)

    def __contains__(self, key: object) -> bool:
        return key in self._t1 or key in self._t2 or key in self._held

    def evictable_count(self) -> int:
        return len(self._t1) + len(self._t2)

    # --- pool interface --------------------------------------------------------------------------------------
    def insert(self, key: Hashable, evictable: bool) -> None:
        if key in self._t1 or key in self._t2 or key in self._held:
            self.touch(key)
            self.set_evictable(key, evictable)
            return
        where = self._adapt_on_ghost_hit(key) if key in self._b1 or key in self._b2 else 0
        if where == 0:
            self._trim_ghosts_for_new_key()
            where = _T1
        self._place(key, where, evictable)

    def touch(self, key: Hashable) -> None:
        if key in self._t1:
            del self._t1[key]
            self._t2[key] = None
        elif key in self._t2:
            self._t2.move_to_end(key)
        else:
            where = self._held.get(key)
            if where == _T1:
                self._held[key] = _T2
                self._held1 -= 1
                self._held2 += 1

    def set_evictable(self, key: Hashable, evictable: bool) -> None:
        if evictable:
            where = self._held.pop(key, 0)
            if where == _T1:
                self._held1 -= 1
                self._t1[key] = None
            elif where == _T2:
                self._held2 -= 1
                self._t2[key] = None
        elif key in self._t1:
            del self._t1[key]
            self._held[key] = _T1
            self._held1 += 1
        elif key in self._t2:
            del self._t2[key]
            self._held[key] = _T2
            self._held2 += 1

    def set_evictable_as_victim(self, key: Hashable) -> None:
        where = self._held.get(key, 0)
        self.set_evictable(key, True)
        if where == _T1:
            self._t1.move_to_end(key, last=False)
        elif where == _T2:
            self._t2.move_to_end(key, last=False)

    def evict(self) -> Hashable | None:
        return self._replace(in_b2=False)

    def remove(self, key: Hashable) -> None:
        if self._t1.pop(key, 0) is None or self._t2.pop(key, 0) is None:
            return
        where = self._held.pop(key, 0)
        if where == _T1:
            self._held1 -= 1
        elif where == _T2:
            self._held2 -= 1
        else:
            self._b1.pop(key, None)
            self._b2.pop(key, None)

    def clear(self) -> None:
        for d in (self._t1, self._t2, self._b1, self._b2, self._held):
            d.clear()
        self._held1 = self._held2 = 0
        self.p = self.p_initial

    def candidates(self, n: int) -> list[Hashable]:
        # The next n victims in the order evict() would take them: REPLACE takes T1's LRU end while |T1| > p,
        # else T2's (evictions do not move p).
        out: list[Hashable] = []
        it1, it2 = iter(self._t1), iter(self._t2)
        left1, left2 = len(self._t1), len(self._t2)
        t1 = left1 + self._held1
        while len(out) < n and (left1 or left2):
            if (t1 >= 1 and t1 > self.p and left1) or not left2:
                out.append(next(it1))
                left1 -= 1
                t1 -= 1
            else:
                out.append(next(it2))
                left2 -= 1
        return out

    # --- batch forms: the loops of the single forms with the lookups bound once (the pool calls these per batch) --
    def insert_many(self, keys: Sequence[Hashable], evictable: bool) -> None:
        t1, t2, b1, b2, held = self._t1, self._t2, self._b1, self._b2, self._held
        c = self.capacity
        for key in keys:
            if key in t1 or key in t2 or key in held:
                self.touch(key)
                self.set_evictable(key, evictable)
                continue
            if key in b1 or key in b2:
                where = self._adapt_on_ghost_hit(key)
            else:  # _trim_ghosts_for_new_key, inline
                n1 = len(t1) + self._held1
                if n1 + len(b1) >= c:
                    if b1:
                        b1.popitem(last=False)
                elif b2 and n1 + len(t2) + self._held2 + len(b1) + len(b2) >= 2 * c:
                    b2.popitem(last=False)
                where = _T1
            if not evictable:
                held[key] = where
                if where == _T1:
                    self._held1 += 1
                else:
                    self._held2 += 1
            elif where == _T1:
                t1[key] = None
            else:
                t2[key] = None

    def touch_many(self, keys: Sequence[Hashable]) -> None:
        t1, t2, held = self._t1, self._t2, self._held
        move = t2.move_to_end
        promoted = 0
        for key in keys:
            if key in t1:
                del t1[key]
                t2[key] = None
            elif key in t2:
                move(key)
            elif held.get(key) == _T1:
                held[key] = _T2
                promoted += 1
        if promoted:
            self._held1 -= promoted
            self._held2 += promoted

    def set_evictable_many(self, keys: Sequence[Hashable], evictable: bool) -> None:
        t1, t2, held = self._t1, self._t2, self._held
        d1 = d2 = 0
        if evictable:
            pop = held.pop
            for key in keys:
                where = pop(key, 0)
                if where == _T1:
                    d1 -= 1
                    t1[key] = None
                elif where == _T2:
                    d2 -= 1
                    t2[key] = None
        else:
            for key in keys:
                if key in t1:
                    del t1[key]
                    held[key] = _T1
                    d1 += 1
                elif key in t2:
                    del t2[key]
                    held[key] = _T2
                    d2 += 1
        self._held1 += d1
        self._held2 += d2

    def hit_many(self, keys: Sequence[Hashable], newly_held: Sequence[Hashable]) -> None:
        # Held, then touched: an evictable entry of T1 or T2 ends held in T2, a held one moves from T1 to T2.
        # (set_evictable(key, False) is a no-op for a held key, so newly_held adds nothing to what keys say.)
        t1, t2, held = self._t1, self._t2, self._held
        d1 = d2 = 0
        for key in keys:
            if key in t1:
                del t1[key]
                held[key] = _T2
                d2 += 1
            elif key in t2:
                del t2[key]
                held[key] = _T2
                d2 += 1
            elif held.get(key) == _T1:
                held[key] = _T2
                d1 -= 1
                d2 += 1
        self._held1 += d1
        self._held2 += d2

    def evict_many(self, n: int) -> list[Hashable]:
        # REPLACE n times (as evict() runs it); evictions never move p, and T1's held count is fixed meanwhile.
        t1, t2, b1, b2 = self._t1, self._t2, self._b1, self._b2
        p = self.p
        held1 = self._held1
        out: list[Hashable] = []
        for _ in range(n):
            n1 = len(t1) + held1
            if (n1 >= 1 and n1 > p and t1) or not t2:
                if not t1:
                    break
                victim = t1.popitem(last=False)[0]
                b1[victim] = None
            else:
                victim = t2.popitem(last=False)[0]
                b2[victim] = None
            out.append(victim)
        return out

    # --- the paper's algorithm for one reference ---------------------------------------------------------------
    def request(self, key: Hashable) -> bool:
        """Process one reference to ``key`` exactly as in the paper; returns True on a hit.

        Every entry is treated as evictable. The caller has no data to manage; this is the simulator form.
        """
        if key in self._t1 or key in self._t2 or key in self._held:
            self.touch(key)
            return True
        c = self.capacity
        in_b2 = key in self._b2
        where = self._adapt_on_ghost_hit(key)
        if where:  # cases II and III
            if self.t1_size() + self.t2_size() >= c:
                self._replace(in_b2)
            self._place(key, where, True)
            return False
        # case IV
        t1 = self.t1_size()
        if t1 + len(self._b1) >= c:
            if t1 < c:
                self._b1.popitem(last=False)
                self._replace(False)
            else:
                self._t1.popitem(last=False)  # B1 is empty: the LRU page of T1 leaves without a ghost
        else:
            total = t1 + self.t2_size() + len(self._b1) + len(self._b2)
            if total >= c:
                if total >= 2 * c and self._b2:
                    self._b2.popitem(last=False)
                if t1 + self.t2_size() >= c:
                    self._replace(False)
        self._place(key, _T1, True)
        return False

    # --- internals ----------------------------------------------------------------------------------------------
    def _adapt_on_ghost_hit(self, key: Hashable) -> int:
        """Cases II/III: adapt p on a ghost hit and drop the ghost; returns _T2, or 0 when ``key`` is no ghost."""
        if key in self._b1:
            delta = max(len(self._b2) / len(self._b1), 1.0)
            self.p = min(float(self.capacity), self.p + delta)
            del self._b1[key]
            return _T2
        if key in self._b2:
            delta = max(len(self._b1) / len(self._b2), 1.0)
            self.p = max(0.0, self.p - delta)
            del self._b2[key]
            return _T2
        return 0

    def _trim_ghosts_for_new_key(self) -> None:
        """Case IV's directory bounds, when the pool already made room in the cache itself."""
        c = self.capacity
        b1 = self._b1
        t1 = len(self._t1) + self._held1
        if t1 + len(b1) >= c:
            if b1:
                b1.popitem(last=False)
        elif t1 + len(self._t2) + self._held2 + len(b1) + len(self._b2) >= 2 * c and self._b2:
            self._b2.popitem(last=False)

    def _place(self, key: Hashable, where: int, evictable: bool) -> None:
        if not evictable:
            self._held[key] = where
            if where == _T1:
                self._held1 += 1
            else:
                self._held2 += 1
        elif where == _T1:
            self._t1[key] = None
        else:
            self._t2[key] = None

    def _replace(self, in_b2: bool) -> Hashable | None:
        """REPLACE(x, p): move the chosen LRU entry of T1 or T2 to its ghost list and return its key."""
        t1 = len(self._t1) + self._held1
        prefer_t1 = t1 >= 1 and ((in_b2 and t1 == self.p) or t1 > self.p)
        if (prefer_t1 and self._t1) or not self._t2:
            if not self._t1:
                return None
            victim = self._t1.popitem(last=False)[0]
            self._b1[victim] = None
        else:
            victim = self._t2.popitem(last=False)[0]
            self._b2[victim] = None
        return victim

    # --- inspection ---------------------------------------------------------------------------------------------
    def get_stats(self) -> dict[str, float | int]:
        """Sizes of T1, T2 (held entries included), B1, B2, the adaptive target ``p`` and the capacity (seed 000)."""
        return {
            "t1": self.t1_size(),
            "t2": self.t2_size(),
            "b1": len(self._b1),
            "b2": len(self._b2),
            "p": self.p,
            "capacity": self.capacity,
        }

    def lists(self) -> dict[str, list[Hashable]]:
        """T1, T2 (evictable entries, LRU first), B1, B2 and held keys; for tests and debugging."""
        return {
            "T1": list(self._t1),
            "T2": list(self._t2),
            "B1": list(self._b1),
            "B2": list(self._b2),
            "held": list(self._held),
        }
