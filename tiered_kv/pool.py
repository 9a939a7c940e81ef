"""BlockPool: the bookkeeping of one tier (no I/O of its own, no eviction order of its own).

Life of a slot::

    FREE --allocate--> MUTABLE --register--> REGISTERED (refs > 0: active) --last release--> inactive (refs == 0)
      ^                   |                        |                                              |
      +---- release ------+                        +--- pinned: never evicted                     |
      +------------------------------- evicted (victim chosen by the policy) <--------------------+

A registered block stays matchable while inactive, until the policy picks it as a victim because a slot is
needed. Registering a hash that is already present returns the existing block (deduplicated) and frees the new
slot. Every match hands out a new :class:`~tiered_kv.blocks.ImmutableBlock`, each owning one reference.

Locking. One lock guards the bookkeeping; every public call takes it once per batch. Storage calls that may do
I/O (the disk tier's writes) run outside it: registrations on a persistent storage are serialised by a second
lock, held across "validate, write, commit", so that two writers of one hash cannot both commit a row.
Handles dropped without ``release()`` are queued by their finalizer (which must never take a lock: it can run
inside any code, this pool's included) and released at the next call.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from enum import IntEnum
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .blocks import ImmutableBlock, MutableBlock, _Block
from .enums import plain
from .errors import BlockNotComplete, BlockPoolError, CorruptBlockError, InvalidBlockError, NotEnoughBlocksAvailable
from .hashing import parents_of, plain_hashes
from .metrics import PoolMetrics
from .policies import EvictionPolicy
from .storage.base import BlockStorage
from .tokens import encode_tokens

if TYPE_CHECKING:
    from .config import ModelConfig
    from .events import EventBus
    from .sources import MatchSource

__all__ = ["BlockPool", "BlockState", "EvictionHandler"]

_FREE = 0
_MUTABLE = 1
_REGISTERED = 2
_DOOMED = 3  # dropped from the index while still referenced; freed at the last release
_PARENT_TYPES = frozenset({bytes, type(None)})

#: How many of the policy's next candidates a protected eviction looks through for a victim (_pick_unprotected).
PICK_WINDOW = 64


def _kids(children: dict[bytes, bytes | set[bytes]], parent: bytes) -> tuple[bytes, ...] | set[bytes]:
    """The children recorded under ``parent`` (see ``BlockPool._children``), as an iterable."""
    kids = children.get(parent)
    if kids is None:
        return ()
    return (kids,) if isinstance(kids, bytes) else kids


def _add_child(children: dict[bytes, bytes | set[bytes]], parent: bytes, child: bytes) -> None:
    kids = children.get(parent)
    if kids is None:
        children[parent] = child
    elif isinstance(kids, bytes):
        if kids != child:
            children[parent] = {kids, child}
    else:
        kids.add(child)


def _drop_child(children: dict[bytes, bytes | set[bytes]], parent: bytes, child: bytes) -> None:
    kids = children.get(parent)
    if kids is None:
        return
    if isinstance(kids, bytes):
        if kids == child:
            del children[parent]
    else:
        _drop_from_set(children, parent, kids, child)


def _drop_from_set(children: dict[bytes, bytes | set[bytes]], parent: bytes, kids: set[bytes], child: bytes) -> None:
    kids.discard(child)
    if len(kids) == 1:
        children[parent] = next(iter(kids))  # back to the single-child form
    elif not kids:
        del children[parent]


class BlockState(IntEnum):
    """State of a slot, in priority order: PINNED > CACHED > ALLOCATED > FREE.

    Of the states that hold data, only CACHED blocks (registered, inactive) are ever evicted; ALLOCATED and PINNED
    blocks stay until released or unpinned.
    """

    FREE = 0
    ALLOCATED = 1  # mutable, or registered and referenced
    CACHED = 2  # registered and inactive: evictable
    PINNED = 3  # never evicted


#: Called under the pool lock with the ``(hash, slot)`` victims of one allocation, before their slots are reused.
EvictionHandler = Callable[[list[tuple[bytes, int]]], None]


class BlockPool:
    """The blocks of one tier.

    Args:
        tier: "device", "host" or "disk".
        storage: where the bytes live.
        policy: eviction policy over this pool's registered blocks.
        hash_length: byte length of a sequence hash (32 for sha256, 16 for xxh3_128).
    """

    def __init__(
        self,
        tier: str,
        storage: BlockStorage,
        policy: EvictionPolicy,
        hash_length: int,
        *,
        closed: Callable[[], bool] | None = None,
    ) -> None:
        n = storage.num_blocks
        self.tier = tier
        self.storage = storage
        self.model: ModelConfig = storage.model
        self.policy = policy
        self.hash_length = hash_length
        self.metrics = PoolMetrics(tier)
        # Lock order: a pool's _register_lock before its _lock. Pools in tier order, device -> host -> disk: an
        # eviction handler running under one pool's _lock takes the next tier's locks, never the reverse (a match
        # asks higher sources with the lock-free may_hold). Storage locks (DiskStore._commit_lock, then
        # DiskStore._lock) come after every pool lock and never call back into a pool.
        self._lock = threading.Lock()
        self._persistent = storage.persistent
        # Whether the storage does anything on discard (the disk deletes rows; arenas keep the base no-op).
        self._discards = type(storage).discard is not BlockStorage.discard
        self._register_lock = threading.Lock() if storage.persistent else None
        self._n = n
        self._free: list[int] = list(range(n - 1, -1, -1))  # a stack: low slots first
        self._state = [_FREE] * n
        self._refs = [0] * n
        self._pins = [0] * n
        self._gen = [0] * n
        self._slot_hash: list[bytes | None] = [None] * n
        # Token ids a block was registered with (little-endian uint32 bytes), when the caller gave them: a match
        # that brings its own tokens verifies them, so a hash collision is a miss instead of someone else's KV.
        self._tokens: list[bytes | None] = [None] * n
        # Each registered block's parent (the previous block of its sequence; None: a chain head or unknown).
        self._parents: list[bytes | None] = [None] * n
        # Parent hash -> the registered hashes here that name it: the one child itself (a chain, the common case:
        # no set object per block), or a set of two or more. See _kids / _add_child / _drop_child.
        self._children: dict[bytes, bytes | set[bytes]] = {}
        # Registrations a writeback wants to see, as (sequence number, hash), when one is attached.
        self._written_log: deque[tuple[int, bytes]] | None = None
        self._log_seq: Callable[[], int] | None = None
        self._on_logged: Callable[[], None] | None = None
        self._by_hash: dict[bytes, int] = {}
        self._pending: deque[tuple[int, int, int]] = deque()  # (kind, slot, gen) from finalizers
        self._on_evict: EvictionHandler | None = None
        self._on_stored: EvictionHandler | None = None  # write-through hook: new (hash, slot), under the lock
        # Hashes dropped outside eviction (invalidate, reset): the scheduler reaps their descendants if they left
        # every tier. Called under the lock: must only record (a deque extend).
        self._on_removed: Callable[[list[bytes]], None] | None = None
        self._only_parents = False  # see set_removal_hook
        self._parent_present: Callable[[bytes], bool] | None = None
        self._low_free = 0
        self._on_low_free: Callable[[], None] | None = None
        self.events: EventBus | None = None  # set by the manager; publishing is a deque append
        # The owner's shutdown flag: calls on a closed manager's pools raise ShutdownError.
        self._closed: Callable[[], bool] = closed if closed is not None else (lambda: False)

    # ---------------------------------------------------------------------------------------------- inspection
    def total_blocks(self) -> int:
        """Number of slots."""
        return self._n

    def available_blocks(self) -> int:
        """Free slots plus evictable (inactive, unpinned) registered blocks."""
        with self._lock:
            self._drain_pending()
            return len(self._free) + self.policy.evictable_count()

    def free_blocks(self) -> int:
        """Free slots (not counting evictable blocks); a snapshot without taking the lock."""
        return len(self._free)

    def usage_rate(self) -> float:
        """``(total - available) / total``."""
        return (self._n - self.available_blocks()) / self._n

    def cache_hit_rate(self) -> float:
        """Matched / looked-up hashes in this pool."""
        return self.metrics.hit_rate

    def holds(self, sequence_hash: bytes) -> bool:
        """Whether the hash is registered here, taking the lock (so a move in progress under it has finished)."""
        with self._lock:
            return sequence_hash in self._by_hash

    def may_hold(self, sequence_hash: bytes) -> bool:
        """Lock-free membership (may be a moment stale; see :meth:`tiered_kv.sources.MatchSource.may_hold`)."""
        return sequence_hash in self._by_hash

    def __contains__(self, sequence_hash: object) -> bool:
        return sequence_hash in self._by_hash

    def __len__(self) -> int:
        """Registered (matchable) blocks."""
        return len(self._by_hash)

    def cached_hashes(self) -> list[bytes]:
        """Every matchable hash, in no particular order."""
        with self._lock:
            return list(self._by_hash)

    def block_state(self, block_id: int) -> BlockState:
        """Eviction priority of a slot."""
        if not 0 <= block_id < self._n:
            raise IndexError(f"block_id must be in [0, {self._n}), got {block_id}")
        with self._lock:
            self._drain_pending()
            state = self._state[block_id]
            if state == _FREE:
                return BlockState.FREE
            if self._pins[block_id]:
                return BlockState.PINNED
            if state == _REGISTERED and self._refs[block_id] == 0:
                return BlockState.CACHED
            return BlockState.ALLOCATED

    def stats(self) -> dict[str, Any]:
        """Counters and occupancy of this pool."""
        with self._lock:
            self._drain_pending()
            free = len(self._free)
            evictable = self.policy.evictable_count()
            registered = len(self._by_hash)
            pinned = sum(1 for p in self._pins if p)
            mutable = sum(1 for s in self._state if s == _MUTABLE)
            get_stats = getattr(self.policy, "get_stats", None)
            policy_stats = get_stats() if callable(get_stats) else None
        m = self.metrics
        return {
            "total_blocks": self._n,
            "available_blocks": free + evictable,
            "free_blocks": free,
            "cached_blocks": registered,
            "inactive_blocks": evictable,
            "active_blocks": registered - evictable,
            "mutable_blocks": mutable,
            "pinned_blocks": pinned,
            "usage_rate": (self._n - free - evictable) / self._n,
            "hits": m.hits,
            "misses": m.misses,
            "hit_rate": m.hit_rate,
            "evictions": m.evictions,
            "eviction_rate": m.eviction_rate(60.0),
            "corrupt_blocks": m.corrupt,
            "residency": m.residency(),
            **({"policy": policy_stats} if policy_stats is not None else {}),
        }

    # ---------------------------------------------------------------------------------------------- allocation
    def set_eviction_handler(self, handler: EvictionHandler | None) -> None:
        """Install the callback that sees victims before their slots are reused (the offload scheduler's hook)."""
        self._on_evict = handler

    def set_removal_hook(self, hook: Callable[[list[bytes]], None] | None, *, only_parents: bool = False) -> None:
        """Install the lock-free callback that sees hashes dropped by :meth:`invalidate` and :meth:`reset`.

        ``only_parents``: report only hashes with registered children here. For a pool that is the whole hierarchy
        (no other tier, no queue), a hash without children here leaves nothing unreachable: reporting every victim
        would cost the reaper a lookup per eviction for nothing.
        """
        self._on_removed = hook
        self._only_parents = only_parents

    def set_stored_handler(self, handler: EvictionHandler | None) -> None:
        """Install the callback that sees newly registered ``(hash, slot)`` pairs (write-through to a remote)."""
        self._on_stored = handler

    def set_pressure_hook(self, low_free: int, hook: Callable[[], None] | None) -> None:
        """Call ``hook`` (cheap, lock-free, e.g. ``Event.set``) when an allocation leaves fewer than ``low_free``
        free slots: the scheduler's cue to clean ahead of need."""
        self._low_free = low_free
        self._on_low_free = hook

    def allocate_blocks(self, n: int) -> list[MutableBlock]:
        """Allocate ``n`` mutable blocks, all or nothing, evicting inactive blocks if needed.

        Raises:
            NotEnoughBlocksAvailable: fewer than ``n`` blocks are free or evictable; nothing was allocated.
            ValueError: ``n`` is not a non-negative int.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        self._check_open()
        with self._lock:
            return self._allocate_locked(n)

    def allocate_up_to(self, n: int, protect: AbstractSet[bytes] | None = None) -> list[MutableBlock]:
        """Allocate as many of ``n`` blocks as the pool can give now (possibly none); never raises for room.

        For internal movers that take what fits (promotion truncates, demotion drops the rest). ``protect``:
        hashes that must not be evicted to make the room (the ancestors of the blocks about to be written: writing
        a chain's tail must not cost its head).
        """
        self._check_open()
        with self._lock:
            if self._pending:
                self._drain_pending()
            room = min(n, len(self._free) + self.policy.evictable_count())
            return self._allocate_locked(room, protect) if room > 0 else []

    def _allocate_locked(self, n: int, protect: AbstractSet[bytes] | None = None) -> list[MutableBlock]:
        if self._pending:
            self._drain_pending()
        free = self._free
        policy = self.policy
        available = len(free) + policy.evictable_count()
        if n > available:
            raise NotEnoughBlocksAvailable(n, available, self.tier)
        slots: list[int] = []
        take = min(n, len(free))
        if take:
            slots = free[-take:]
            del free[-take:]
            slots.reverse()
        if len(slots) < n:
            try:
                victims = self._evict_locked(n - len(slots), protect)
            except BaseException:
                free.extend(reversed(slots))
                raise
            slots.extend(slot for _, slot in victims)
        if self._on_low_free is not None and len(free) < self._low_free:
            self._on_low_free()
        state, gen = self._state, self._gen
        out = []
        for slot in slots:
            state[slot] = _MUTABLE
            g = gen[slot] + 1
            gen[slot] = g
            out.append(MutableBlock(self, slot, g))
        return out

    def _evict_locked(self, count: int, protect: AbstractSet[bytes] | None = None) -> list[tuple[bytes, int]]:
        """Take ``count`` victims from the policy, checking each one, and drop them from the index.

        With ``protect``, fewer victims may be returned: those hashes are never chosen.
        """
        policy = self.policy
        by_hash, refs, pins, state = self._by_hash, self._refs, self._pins, self._state
        victims: list[tuple[bytes, int]] = []
        if protect or (self._persistent and self._children):
            taken: set[bytes] = set()
            for _ in range(count):
                key: Any
                if protect:
                    key = self._pick_unprotected(taken, protect)
                    if key is None:
                        break
                else:
                    key = self._pick_unprotected(taken, frozenset())
                    if key is None:  # every candidate heads a held chain: take the policy's choice
                        key = policy.evict()
                self._check_victim(key, victims)
                victims.append((key, by_hash[key]))
                taken.add(key)
        else:
            keys = policy.evict_many(count)
            get = by_hash.get
            for i, key in enumerate(keys):
                slot = get(key) if type(key) is bytes else None
                if slot is None or refs[slot] or pins[slot] or state[slot] != _REGISTERED:
                    self._check_victim(key, victims, keys[i + 1 :])
                    slot = by_hash[key]
                victims.append((key, slot))
        slot_hash, parents, children = self._slot_hash, self._parents, self._children
        for h, slot in victims:
            del by_hash[h]
            slot_hash[slot] = None
            par = parents[slot]
            if par is not None:  # _unlink, inline
                kids = children.get(par)
                if kids is not None:
                    if isinstance(kids, bytes):
                        if kids == h:
                            del children[par]
                    else:
                        _drop_from_set(children, par, kids, h)
            state[slot] = _FREE
        if not victims:
            return victims
        if self._on_evict is not None:
            self._on_evict(victims)
        hashes = [h for h, _ in victims]
        if self._on_removed is not None and (self._persistent or self._on_evict is None):
            # Gone from the disk (or from the lowest tier): the reaper checks what under them is left unreachable.
            # A memory tier's victims go down through its handler, which reports the ones it drops itself.
            self._report_removed(hashes)
        if self._discards:
            self.storage.discard([s for _, s in victims], hashes)
        self.metrics.record_evictions(victims, "capacity")
        if self.events is not None and self.events.active:
            self.events.publish("removed", self.tier, hashes)
        return victims

    def _check_victim(self, key: Any, victims: list[tuple[bytes, int]], also_taken: Sequence[Any] = ()) -> None:
        """Refuse a key that is not an evictable block here (a misbehaving user policy), putting back what was
        taken, rather than corrupt the pool. Lock held."""
        slot = self._by_hash.get(key) if isinstance(key, bytes) else None
        if slot is not None and not self._refs[slot] and not self._pins[slot] and self._state[slot] == _REGISTERED:
            return
        policy = self.policy
        for h, _s in victims:
            policy.insert(h, True)
        for h in also_taken:
            if isinstance(h, bytes) and h in self._by_hash:
                policy.insert(h, True)
        raise InvalidBlockError(
            f"eviction policy {type(policy).__name__} of the {self.tier} pool returned {key!r}, "
            "which is not an evictable block of this pool"
        )

    def _pick_unprotected(self, taken: set[bytes], protect: AbstractSet[bytes]) -> bytes | None:
        """A victim outside ``protect`` among the policy's next candidates, removed from the policy; None when
        there is none.

        In a persistent tier, tails leave before heads (as vLLM's prefix cache frees them): for a candidate with
        descendants here, its deepest evictable descendant goes instead, and a candidate whose descendants are
        all held is passed over. A head's eviction would leave its tail unreachable, since a match stops at the
        first miss; the head keeps its place in the policy.
        """
        policy = self.policy
        skip = taken | protect if protect else taken
        for c in policy.candidates(PICK_WINDOW):
            if not isinstance(c, bytes) or c in taken:
                continue
            if self._persistent:
                victim = self._evictable_leaf(c, skip)
                if victim is None and c not in protect and not self._has_children_here(c):
                    victim = c
            else:
                victim = None if c in protect else c
            if victim is not None:
                policy.remove(victim)
                return victim
        return None

    def _has_children_here(self, h: bytes) -> bool:
        by_hash = self._by_hash
        return any(c in by_hash for c in _kids(self._children, h))

    def refused(self, hashes: Sequence[bytes], parents: Sequence[bytes | None]) -> set[int]:
        """Indices of blocks this tier would refuse as orphans right now (see ``set_parent_lookup``): movers leave
        them out before making room."""
        with self._lock:
            return self._orphans_locked(list(hashes), list(parents))

    def _evictable_leaf(self, head: bytes, taken: AbstractSet[bytes]) -> bytes | None:
        """The deepest inactive descendant of ``head`` in this pool along one path (None when it has none)."""
        by_hash, refs, pins, state, children = self._by_hash, self._refs, self._pins, self._state, self._children
        found = None
        node = head
        while True:
            nxt = None
            for c in _kids(children, node):
                slot = by_hash.get(c)
                if slot is not None and c not in taken and not refs[slot] and not pins[slot] and (
                    state[slot] == _REGISTERED
                ):
                    nxt = c
                    break
            if nxt is None:
                return found
            found = node = nxt

    def _unlink(self, h: bytes, slot: int) -> None:
        """Forget ``h`` as its parent's child (it left this pool). Lock held."""
        par = self._parents[slot]
        if par is not None:
            _drop_child(self._children, par, h)

    def holding(self, sequence_hashes: Sequence[bytes]) -> set[bytes]:
        """Those of ``sequence_hashes`` registered here, under the lock (as :meth:`holds`, for many)."""
        with self._lock:
            by_hash = self._by_hash
            return {h for h in sequence_hashes if h in by_hash}

    def children_of_many(self, sequence_hashes: Sequence[bytes]) -> list[bytes]:
        """Registered hashes of this pool whose parent is one of ``sequence_hashes`` (one lock acquisition)."""
        with self._lock:
            children, by_hash = self._children, self._by_hash
            return [c for h in sequence_hashes for c in _kids(children, h) if c in by_hash]

    def children_of(self, sequence_hash: bytes) -> list[bytes]:
        """Registered hashes of this pool whose parent is ``sequence_hash``."""
        return self.children_of_many([sequence_hash])

    def evict_inactive(self, count: int) -> list[tuple[bytes, int]]:
        """Evict up to ``count`` inactive blocks now and free their slots (used by ``trigger_eviction``)."""
        self._check_open()
        with self._lock:
            self._drain_pending()
            count = min(count, self.policy.evictable_count())
            victims = self._evict_locked(count) if count > 0 else []
            self._free.extend(slot for _, slot in victims)
            return victims

    async def allocate_blocks_async(self, n: int, timeout: float | None = None) -> list[MutableBlock]:
        """Async twin of :meth:`allocate_blocks`.

        With ``timeout=None`` it fails at once like the sync call; with a timeout it waits (without blocking the
        event loop) for blocks to be released, then raises :class:`NotEnoughBlocksAvailable`.
        """
        if timeout is None:
            return self.allocate_blocks(n)
        if n > self._n:
            raise NotEnoughBlocksAvailable(n, self.available_blocks(), self.tier)
        deadline = time.monotonic() + max(0.0, timeout)
        delay = 0.0005
        while True:
            try:
                return self.allocate_blocks(n)
            except NotEnoughBlocksAvailable:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                await asyncio.sleep(min(delay, left))
                delay = min(delay * 2, 0.02)

    # --------------------------------------------------------------------------------------------- registration
    def register_blocks(
        self,
        blocks: Sequence[MutableBlock],
        sequence_hashes: Sequence[bytes],
        tokens: Any = None,
        parents: Sequence[bytes | None] | None = None,
    ) -> list[ImmutableBlock]:
        """Make filled blocks immutable and matchable under their sequence hashes.

        A hash already present returns the existing block (deduplicated) and frees the new one. The mutable
        handles are consumed.

        Args:
            blocks: filled mutable blocks of this pool.
            sequence_hashes: one hash per block.
            tokens: optional, one entry per block: its ``page_size`` token ids, stored with the block so that a
                later ``match_sequence_hashes(..., tokens=...)`` can verify them.
            parents: optional, one entry per block: its parent's hash (None: a chain head). By default each hash's
                ``.parent`` where it has one (``SequenceHash`` values from ``compute_sequence_hashes``), else None.

        Raises:
            ValueError: lengths differ, a hash has the wrong type or length, or a tokens entry is malformed.
            InvalidBlockError: a block is released, registered twice in the call, or from another pool; or a hash
                is already registered with other token ids (a hash collision).
        """
        blocks = list(blocks)
        pars = self._parents_of(sequence_hashes, parents)
        # Plain bytes from here on: the parents are taken, and a stored SequenceHash would keep its chain alive.
        hashes = self.validate_hashes(sequence_hashes, "sequence_hashes")  # plain bytes
        if len(blocks) != len(hashes):
            raise ValueError(f"blocks and sequence_hashes differ in length: {len(blocks)} != {len(hashes)}")
        toks = self._encode_tokens(tokens, len(blocks))
        self._check_open()
        if self._register_lock is None:
            with self._lock:
                self._validate_mutable(blocks)
                self._check_collisions(hashes, toks)
                self._check_written(blocks)
                return self._register_locked(blocks, hashes, toks, pars)
        with self._register_lock:
            with self._lock:
                self._validate_mutable(blocks)
                self._check_collisions(hashes, toks)
                self._check_written(blocks)
                new: list[tuple[int, bytes, bytes | None, bytes | None]] = []
                seen: set[bytes] = set()
                orphans = self._orphans_locked(hashes, pars)
                for i, (b, h) in enumerate(zip(blocks, hashes)):
                    if h not in self._by_hash and h not in seen and i not in orphans:
                        seen.add(h)
                        new.append((b.block_id, h, toks[i] if toks is not None else None, pars[i]))
            # Crash ordering lives in the storage: data first, then its registry rows, in one batch.
            if new:
                self.storage.commit(
                    [e[0] for e in new], [e[1] for e in new], [e[2] for e in new], parents=[e[3] for e in new]
                )
            with self._lock:
                # The orphans decided before the commit: a committed row's block must be registered.
                return self._register_locked(blocks, hashes, toks, pars, orphans)

    def _parents_of(self, hashes: Sequence[bytes], parents: Sequence[bytes | None] | None) -> list[bytes | None]:
        if parents is None:
            return parents_of(hashes)  # a SequenceHash carries its parent; plain bytes have none
        if isinstance(parents, (bytes, str)) or len(parents) != len(hashes):
            got = len(parents) if hasattr(parents, "__len__") else type(parents).__name__
            raise ValueError(f"parents: expected one entry per block ({len(hashes)}), got {got}")
        size = self.hash_length
        if set(map(type, parents)) <= _PARENT_TYPES and {len(p) for p in parents if p is not None} <= {size}:
            return list(parents)  # the common case, checked at C speed
        out: list[bytes | None] = []
        for i, p in enumerate(parents):
            if p is not None and (not isinstance(p, (bytes, bytearray)) or len(p) != self.hash_length):
                raise ValueError(f"parents[{i}]: expected None or {self.hash_length} bytes, got {p!r}")
            out.append(bytes(p) if p is not None else None)
        return out

    def parent_of(self, sequence_hash: bytes) -> bytes | None:
        """The parent recorded for a registered hash (None: a chain head, unknown, or not registered here)."""
        with self._lock:
            slot = self._by_hash.get(sequence_hash)
            return self._parents[slot] if slot is not None else None

    def parents_of(self, blocks: Sequence[_Block]) -> list[bytes | None]:
        """The parent each held registered block was stored with."""
        return [self._parents[b.block_id] for b in blocks]

    def log_registrations(self, seq: Callable[[], int], wake: Callable[[], None]) -> None:
        """Record every new registration for a background writeback, which drains :meth:`take_registrations`."""
        with self._lock:
            self._written_log = deque()
            self._log_seq = seq
            self._on_logged = wake

    def logged_registrations(self) -> int:
        """Registrations logged and not yet taken by the writeback."""
        log = self._written_log
        return len(log) if log is not None else 0

    def take_registrations(self) -> list[tuple[int, bytes]]:
        """The ``(sequence, hash)`` registrations logged since the last call, oldest first."""
        with self._lock:
            log = self._written_log
            if not log:
                return []
            out = list(log)
            log.clear()
            return out

    def set_parent_lookup(self, present: Callable[[bytes], bool] | None) -> None:
        """Install the lock-free test "some tier holds this hash", used to refuse orphans at registration."""
        self._parent_present = present

    def _orphans_locked(self, hashes: list[bytes], pars: list[bytes | None] | None) -> set[int]:
        """Indices of new blocks whose parent no tier holds (nor another block of the same call, nor one of its
        orphans' descendants). Lock held."""
        present = self._parent_present
        if present is None or pars is None:
            return set()
        by_hash = self._by_hash
        batch = {h: i for i, h in enumerate(hashes)}
        out: set[int] = set()
        for i, par in enumerate(pars):
            if par is None or par in by_hash:
                continue
            j = batch.get(par)
            if j is not None and j < i:
                # The parent is an earlier block of this call (a chain in order, the common case): an orphan only
                # if that block is one and no tier holds the parent either.
                if j not in out or present(par):
                    continue
                out.add(i)
                continue
            if present(par):
                continue
            if j is None:
                out.add(i)
                continue
            # The parent comes later in the call: walk the ancestors within the call.
            x: bytes | None = par
            seen = 0
            while x is not None and x in batch and seen <= len(hashes):
                x = pars[batch[x]]
                seen += 1
                if x is None or x in by_hash or present(x):
                    break
            else:
                out.add(i)
        return out

    def _encode_tokens(self, tokens: Any, n: int) -> list[bytes | None] | None:
        if tokens is None:
            return None
        if isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__len__") or len(tokens) != n:
            got = len(tokens) if hasattr(tokens, "__len__") else type(tokens).__name__
            raise ValueError(f"tokens: expected one entry per block ({n}), got {got}")
        page = self.model.page_size
        out: list[bytes | None] = []
        for i, t in enumerate(tokens):
            if t is None or isinstance(t, bytes):
                if isinstance(t, bytes) and len(t) != 4 * page:
                    raise ValueError(f"tokens[{i}]: expected {4 * page} bytes of uint32 ids, got {len(t)}")
                out.append(t)
                continue
            enc = encode_tokens(t, f"tokens[{i}]")
            if len(enc) != 4 * page:
                raise ValueError(f"tokens[{i}]: expected {page} token ids, got {len(enc) // 4}")
            out.append(enc)
        return out

    def _check_collisions(self, hashes: list[bytes], toks: list[bytes | None] | None) -> None:
        if toks is None:
            return
        for i, (h, t) in enumerate(zip(hashes, toks)):
            slot = self._by_hash.get(h)
            if slot is not None and t is not None and self._tokens[slot] not in (None, t):
                raise InvalidBlockError(
                    f"sequence_hashes[{i}]: {h.hex()} is registered in the {self.tier} pool with other token ids "
                    "(a hash collision); nothing was registered"
                )

    def tokens_of(self, blocks: Sequence[_Block]) -> list[bytes | None]:
        """The token ids (uint32 bytes) each registered block was stored with, or None where unknown."""
        return [self._tokens[b.block_id] for b in blocks]

    def lineage_at(self, slots: Sequence[int]) -> tuple[list[bytes | None], list[bytes | None]]:
        """Token bytes and parents recorded at ``slots``, e.g. victims inside an eviction handler.

        Lock-free: the caller holds this pool's lock (eviction handlers run under it) or holds the slots' blocks.
        """
        toks, pars = self._tokens, self._parents
        return [toks[s] for s in slots], [pars[s] for s in slots]

    def _validate_mutable(self, blocks: list[MutableBlock]) -> None:
        state, gen = self._state, self._gen
        seen: set[int] = set()
        for i, b in enumerate(blocks):
            if type(b) is not MutableBlock:
                raise InvalidBlockError(f"blocks[{i}]: expected a MutableBlock, got {type(b).__name__}")
            if b._pool is not self:
                raise InvalidBlockError(f"blocks[{i}]: belongs to the {b._pool.tier} pool, not this {self.tier} pool")
            slot = b.block_id
            if b._released or state[slot] != _MUTABLE or gen[slot] != b._gen:
                raise InvalidBlockError(f"blocks[{i}]: {self.tier}:{slot} has been released or registered")
            if slot in seen:
                raise InvalidBlockError(f"blocks[{i}]: {self.tier}:{slot} appears twice")
            seen.add(slot)

    def _check_written(self, blocks: list[MutableBlock]) -> None:
        for i, b in enumerate(blocks):
            if not b._written:
                raise BlockNotComplete(
                    f"blocks[{i}]: {self.tier}:{b.block_id} was never written (layer_view, write, scatter or a copy); "
                    "nothing was registered"
                )

    def _register_locked(
        self,
        blocks: list[MutableBlock],
        hashes: list[bytes],
        toks: list[bytes | None] | None = None,
        pars: list[bytes | None] | None = None,
        orphans: set[int] | None = None,
    ) -> list[ImmutableBlock]:
        by_hash, refs, pins, state, gen = self._by_hash, self._refs, self._pins, self._state, self._gen
        tokens, slot_hash, parents, children = self._tokens, self._slot_hash, self._parents, self._children
        policy = self.policy
        out: list[ImmutableBlock] = []
        add = out.append
        stored: list[bytes] = []
        stored_slots: list[int] = []
        stored_pars: list[bytes | None] = []
        unsent = 0  # stored[unsent:] are not in the policy yet (inserted in one batch call)
        if orphans is None:
            orphans = self._orphans_locked(hashes, pars)
        for i, b in enumerate(blocks):
            h = hashes[i]
            slot = b.block_id
            b._released = True
            existing = by_hash.get(h)
            if existing is None:
                if orphans and i in orphans:
                    # Its parent is in no tier: a match could never reach it. The caller keeps its handle; the block
                    # is not cached and its slot is freed at the last release.
                    self.storage.drop_stage(slot)
                    slot_hash[slot] = None
                    state[slot] = _DOOMED
                    refs[slot] = 1
                    self.metrics.orphans_refused += 1
                    add(ImmutableBlock(self, slot, gen[slot], h))
                    continue
                stored.append(h)
                stored_slots.append(slot)
                by_hash[h] = slot
                slot_hash[slot] = h
                tokens[slot] = toks[i] if toks is not None else None
                par = pars[i] if pars is not None else None
                stored_pars.append(par)
                parents[slot] = par
                if par is not None:
                    kids = children.get(par)
                    if kids is None:
                        children[par] = h
                    elif isinstance(kids, bytes):
                        if kids != h:
                            children[par] = {kids, h}
                    else:
                        kids.add(h)
                state[slot] = _REGISTERED
                refs[slot] = 1
                add(ImmutableBlock(self, slot, gen[slot], h))
            else:
                if unsent < len(stored):  # keep the policy's order of events: earlier inserts first
                    policy.insert_many(stored[unsent:], False)
                    unsent = len(stored)
                r = refs[existing]
                if r == 0 and not pins[existing]:
                    policy.set_evictable(h, False)
                refs[existing] = r + 1
                policy.touch(h)
                if toks is not None and tokens[existing] is None:
                    tokens[existing] = toks[i]
                state[slot] = _FREE
                self.storage.drop_stage(slot)
                self._free.append(slot)
                add(ImmutableBlock(self, existing, gen[existing], h))
        if stored:
            if unsent < len(stored):
                policy.insert_many(stored[unsent:] if unsent else stored, False)
            present = self._parent_present
            if present is not None and self._on_removed is not None:
                # A parent lost while this batch was being written: hand it to the reaper, which drops its
                # descendants (this batch included) so the tier stays prefix-closed.
                gone = {p for p in stored_pars if p is not None and p not in by_hash and not present(p)}
                if gone:
                    self._on_removed(list(gone))
            self.metrics.note_stored(stored_slots)
            if self._on_stored is not None:
                self._on_stored(list(zip(stored, stored_slots)))
            if self._written_log is not None and self._log_seq is not None:
                seq = self._log_seq
                self._written_log.extend((seq(), h) for h in stored)
                if self._on_logged is not None:
                    self._on_logged()
            if self.events is not None and self.events.active:
                self.events.publish("stored", self.tier, stored, stored_pars)
        return out

    # ------------------------------------------------------------------------------------------------- matching
    def match_sequence_hashes(self, sequence_hashes: Sequence[bytes], tokens: Any = None) -> list[ImmutableBlock]:
        """The longest prefix of ``sequence_hashes`` registered in this pool (no promotion from other tiers).

        With ``tokens`` (the request's token ids), a block stored with other token ids is a miss.
        """
        hashes = self.validate_hashes(sequence_hashes, "sequence_hashes")
        expected = self.expected_tokens(tokens, len(hashes))
        self._check_open()
        with self._lock:
            return self._match_locked(hashes, expected)

    def expected_tokens(self, tokens: Any, n: int) -> list[bytes] | None:
        """Split a request's token ids into per-block uint32 bytes for verification (None without tokens)."""
        if tokens is None:
            return None
        enc = encode_tokens(tokens, "tokens")
        width = 4 * self.model.page_size
        if len(enc) < n * width:
            raise ValueError(f"tokens: {len(enc) // 4} token ids cover fewer than the {n} blocks hashed")
        return [enc[i * width : (i + 1) * width] for i in range(n)]

    def _match_locked(self, hashes: list[bytes], expected: list[bytes] | None = None) -> list[ImmutableBlock]:
        out = self._take_run(hashes, 0, (), expected)
        if len(out) < len(hashes):
            self.metrics.misses += 1
        return out

    def match_run(
        self, hashes: list[bytes], start: int, higher: Sequence[MatchSource], expected: list[bytes] | None = None
    ) -> list[ImmutableBlock]:
        """Match ``hashes[start:]`` while present here and absent from every ``higher`` source (cross-tier match).

        Hits are counted here; misses are the caller's to count, since a hash that stops the run because a higher
        tier holds it was not missed here. ``expected``: per-hash token bytes to verify (see ``tokens``).
        """
        self._check_open()
        with self._lock:
            return self._take_run(hashes, start, higher, expected)

    def _take_run(
        self, hashes: list[bytes], start: int, higher: Sequence[Any], expected: list[bytes] | None
    ) -> list[ImmutableBlock]:
        """Reference the run of ``hashes[start:]`` held here (see :meth:`match_run`); counts hits. Lock held."""
        if self._pending:
            self._drain_pending()
        by_hash, refs, pins, gen = self._by_hash, self._refs, self._pins, self._gen
        tokens = self._tokens
        out: list[ImmutableBlock] = []
        add = out.append
        newly_held: list[bytes] = []
        end = start
        for i in range(start, len(hashes)):
            h = hashes[i]
            slot = by_hash.get(h)
            if slot is None or (higher and end > start and any(p.may_hold(h) for p in higher)):
                break
            if expected is not None and tokens[slot] not in (None, expected[i]):
                break
            r = refs[slot]
            if r == 0 and not pins[slot]:
                newly_held.append(h)
            refs[slot] = r + 1
            add(ImmutableBlock(self, slot, gen[slot], h))
            end = i + 1
        if out:
            hit = hashes[start:end]
            self.policy.hit_many(hit, newly_held)
            self.metrics.hits += len(out)
            if self._persistent:
                self.storage.touch(hit)
        return out

    def acquire(self, sequence_hashes: Sequence[bytes]) -> list[ImmutableBlock]:
        """Take a reference on every present hash (not a prefix match; not counted as hits). For internal movers."""
        self._check_open()
        with self._lock:
            by_hash, refs, pins, gen, state = self._by_hash, self._refs, self._pins, self._gen, self._state
            out = []
            for h in sequence_hashes:
                slot = by_hash.get(h)
                if slot is None or state[slot] != _REGISTERED:
                    continue
                r = refs[slot]
                if r == 0 and not pins[slot]:
                    self.policy.set_evictable(h, False)
                refs[slot] = r + 1
                out.append(ImmutableBlock(self, slot, gen[slot], h))
            return out

    def eviction_candidates(self, n: int) -> list[bytes]:
        """Up to ``n`` inactive hashes the policy expects to evict soon."""
        with self._lock:
            return [h for h in self.policy.candidates(n) if isinstance(h, bytes)]

    def touch(self, sequence_hashes: Sequence[bytes]) -> int:
        """Refresh the recency of cached hashes without matching; returns how many were present."""
        hashes = self.validate_hashes(sequence_hashes, "sequence_hashes")
        with self._lock:
            n = 0
            for h in hashes:
                if h in self._by_hash:
                    self.policy.touch(h)
                    n += 1
            return n

    # -------------------------------------------------------------------------------------------------- release
    def release_blocks(self, blocks: Iterable[_Block], *, as_victims: bool = False) -> None:
        """Release many handles with one lock acquisition; already-released handles are skipped.

        ``as_victims``: the holds were a mover's (copying the blocks down), not uses: blocks that become
        evictable go back among the policy's next victims instead of counting as recently used.
        """
        with self._lock:
            if self._pending:
                self._drain_pending()
            refs, pins, state, gen = self._refs, self._pins, self._state, self._gen
            policy = self.policy
            freed: list[bytes] = []  # became evictable: handed to the policy in one call, in release order
            for b in blocks:
                if b._released:
                    continue
                if b._pool is not self:
                    if freed:
                        policy.set_evictable_many(freed, True)
                    raise InvalidBlockError(f"{b!r} belongs to the {b._pool.tier} pool, not this {self.tier} pool")
                b._released = True
                slot = b.block_id
                # Fast path: the last reference to a registered, unpinned block (the common case).
                if type(b) is ImmutableBlock and gen[slot] == b._gen and state[slot] == _REGISTERED:
                    r = refs[slot] - 1
                    if r >= 0:
                        refs[slot] = r
                        if r == 0 and not pins[slot]:
                            if as_victims:
                                policy.set_evictable_as_victim(b.sequence_hash)
                            else:
                                freed.append(b.sequence_hash)
                    continue
                if freed:  # the slow path may talk to the policy too: keep the order of events
                    policy.set_evictable_many(freed, True)
                    freed = []
                self._release_slot(type(b) is MutableBlock, slot, b._gen)
            if freed:
                policy.set_evictable_many(freed, True)

    def _release_one(self, b: _Block) -> None:
        """``release_blocks([b])`` for one handle (``block.release()``), without the batch's setup."""
        with self._lock:
            if self._pending:
                self._drain_pending()
            if b._released:
                return
            b._released = True
            slot = b.block_id
            if type(b) is ImmutableBlock and self._gen[slot] == b._gen and self._state[slot] == _REGISTERED:
                r = self._refs[slot] - 1
                if r >= 0:
                    self._refs[slot] = r
                    if r == 0 and not self._pins[slot]:
                        self.policy.set_evictable(b.sequence_hash, True)
                    return
            self._release_slot(type(b) is MutableBlock, slot, b._gen)

    def _release_slot(self, mutable: bool, slot: int, gen: int) -> bool:
        """Drop one hold on ``slot``; returns whether room was made."""
        if self._gen[slot] != gen:
            return False
        state = self._state[slot]
        if mutable:
            if state != _MUTABLE:
                return False
            self._state[slot] = _FREE
            self.storage.drop_stage(slot)
            self._free.append(slot)
            return True
        r = self._refs[slot] - 1
        if r < 0:
            return False
        self._refs[slot] = r
        if r:
            return False
        if state == _DOOMED:
            self._state[slot] = _FREE
            self._slot_hash[slot] = None
            self._free.append(slot)
            return True
        if not self._pins[slot]:
            h = self._slot_hash[slot]
            self.policy.set_evictable(h, True)
            return True
        return False

    def _release_from_gc(self, block: _Block) -> None:
        # Runs in a finalizer: no lock, just a thread-safe append (see the module docstring).
        block._released = True
        self._pending.append((1 if type(block) is MutableBlock else 0, block.block_id, block._gen))

    def _drain_pending(self) -> None:
        pending = self._pending
        while pending:
            kind, slot, gen = pending.popleft()
            self._release_slot(kind == 1, slot, gen)

    # ------------------------------------------------------------------------------------------------- pinning
    def pin_blocks(self, blocks: Sequence[ImmutableBlock | bytes]) -> None:
        """Pin registered blocks (handles or hashes): pinned blocks are never evicted. Pins are counted."""
        with self._lock:
            slots = self._slots_of(blocks)
            for slot in slots:
                p = self._pins[slot]
                if p == 0 and self._refs[slot] == 0:
                    self.policy.set_evictable(self._slot_hash[slot], False)
                self._pins[slot] = p + 1

    def unpin_blocks(self, blocks: Sequence[ImmutableBlock | bytes]) -> None:
        """Undo one :meth:`pin_blocks` per block; unpinning an unpinned block raises InvalidBlockError."""
        with self._lock:
            slots = self._slots_of(blocks)
            for i, slot in enumerate(slots):
                if self._pins[slot] - slots[:i].count(slot) <= 0:
                    raise InvalidBlockError(f"blocks[{i}]: {self.tier}:{slot} is not pinned")
            for slot in slots:
                p = self._pins[slot] - 1
                self._pins[slot] = p
                if p == 0 and self._refs[slot] == 0 and self._state[slot] == _REGISTERED:
                    self.policy.set_evictable(self._slot_hash[slot], True)

    def _slots_of(self, blocks: Sequence[ImmutableBlock | bytes]) -> list[int]:
        slots = []
        for i, b in enumerate(blocks):
            if isinstance(b, ImmutableBlock):
                if b._pool is not self or b._released:
                    raise InvalidBlockError(f"blocks[{i}]: {b!r} is released or from another pool")
                slot = b.block_id
            elif isinstance(b, (bytes, bytearray)):
                found = self._by_hash.get(bytes(b))
                if found is None:
                    raise InvalidBlockError(
                        f"blocks[{i}]: hash {bytes(b).hex()} is not registered in the {self.tier} pool"
                    )
                slot = found
            else:
                raise InvalidBlockError(
                    f"blocks[{i}]: expected an ImmutableBlock or a sequence hash, got {type(b).__name__}"
                )
            slots.append(slot)
        return slots

    # ---------------------------------------------------------------------------------------------------- data
    def _read_view(self, block: ImmutableBlock, layer: int, outer: int) -> torch.Tensor:
        try:
            return self.storage.read_view(block.block_id, layer, outer)
        except CorruptBlockError:
            self.invalidate([block.sequence_hash], corrupt=True)
            raise

    def gather(self, blocks: Sequence[_Block], out: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int]]:
        """Copy the data of many held blocks out in one call; returns (data, indices that failed verification).

        Blocks failing verification are dropped from this pool (and counted as corrupt).
        """
        self._check_handles(blocks)
        data, bad = self.storage.gather([b.block_id for b in blocks], out)
        if bad:
            self.invalidate(
                [b.sequence_hash for i in bad if isinstance(b := blocks[i], ImmutableBlock)], corrupt=True
            )
        return data, bad

    def read_into(self, blocks: Sequence[_Block], outs: Sequence[torch.Tensor] | Sequence[np.ndarray]) -> list[int]:
        """Read held blocks straight into ``outs`` (one contiguous block tensor each, e.g. another tier's slots, or
        one numpy byte row each where the storage ``reads_into_rows``).

        For storages that do I/O (``storage.persistent``). Returns the indices that failed verification; those
        blocks are dropped from this pool and counted as corrupt, as :meth:`gather` does.
        """
        self._check_handles(blocks)
        bad = self.storage.read_into([b.block_id for b in blocks], outs)
        if bad:
            self.invalidate(
                [b.sequence_hash for i in bad if isinstance(b := blocks[i], ImmutableBlock)], corrupt=True
            )
        return bad

    def stage_views(self, blocks: Sequence[MutableBlock], views: Sequence[torch.Tensor], *, borrow: bool) -> None:
        """Fill mutable blocks of a persistent tier from block tensors (see ``DiskBlockStorage.stage_views``):
        ``borrow=True`` copies nothing and the mover keeps the tensors intact until the blocks are registered or
        released; ``borrow=False`` copies each once into aligned staging."""
        self._check_mutable(blocks)
        self.storage.stage_views([b.block_id for b in blocks], views, borrow=borrow)
        for b in blocks:
            b._written = True

    def _check_handles(self, blocks: Sequence[_Block]) -> None:
        for i, b in enumerate(blocks):
            if b._released or b._pool is not self:
                raise InvalidBlockError(f"blocks[{i}]: {b!r} is released or from another pool")

    def _check_mutable(self, blocks: Sequence[MutableBlock]) -> None:
        for i, b in enumerate(blocks):
            if type(b) is not MutableBlock or b._released or b._pool is not self:
                raise InvalidBlockError(f"blocks[{i}]: {b!r} is not a live MutableBlock of the {self.tier} pool")

    def scatter(self, blocks: Sequence[MutableBlock], data: torch.Tensor) -> None:
        """Fill many mutable blocks from ``data`` (``[n, layers, outer, page, inner]``) in one call."""
        self._check_mutable(blocks)
        self.storage.scatter([b.block_id for b in blocks], data)
        for b in blocks:
            b._written = True

    # ------------------------------------------------------------------------------------------------- removal
    def invalidate(self, sequence_hashes: Sequence[bytes], corrupt: bool = False) -> int:
        """Drop registered blocks from the index now (held ones are freed at their last release)."""
        with self._lock:
            dropped: list[tuple[bytes, int]] = []
            for h in sequence_hashes:
                slot = self._by_hash.pop(h, None)
                if slot is None:
                    continue
                self._unlink(h, slot)
                self.policy.remove(h)
                dropped.append((h, slot))
                if self._refs[slot] == 0 and self._pins[slot] == 0:
                    self._state[slot] = _FREE
                    self._slot_hash[slot] = None
                    self._free.append(slot)
                else:
                    self._state[slot] = _DOOMED
            if corrupt:
                self.metrics.corrupt += len(dropped)
            if dropped:
                self._removed_locked([h for h, _ in dropped], [s for _, s in dropped])
            return len(dropped)

    def _removed_locked(self, hashes: list[bytes], slots: list[int] | None) -> None:
        """Report blocks that left the index: the reaper drops what they leave unreachable, the storage forgets
        their ``slots`` (None: it dropped them itself), subscribers get a "removed" event. Lock held: a snapshot
        taken under the lock (``cached_hashes``) never lacks a hash whose event is not queued yet (what a ledger
        relies on)."""
        self._report_removed(hashes)
        if slots is not None and self._discards:
            self.storage.discard(slots, hashes)
        if self.events is not None and self.events.active:
            self.events.publish("removed", self.tier, hashes)

    def _report_removed(self, hashes: list[bytes]) -> None:
        """Hand removed hashes to the removal hook, if any (lock held): all of them, or with ``only_parents``
        those with children here."""
        hook = self._on_removed
        if hook is None:
            return
        if not self._only_parents:
            hook(hashes)
            return
        children = self._children
        lost = [h for h in hashes if h in children] if children else []
        if lost:
            hook(lost)

    def held_blocks(self) -> int:
        """Blocks that are mutable, referenced or pinned (what :meth:`reset` refuses to drop)."""
        with self._lock:
            self._drain_pending()
            return self._held_locked()

    def _held_locked(self) -> int:
        state, refs, pins = self._state, self._refs, self._pins
        return sum(1 for i in range(self._n) if state[i] != _FREE and (refs[i] or pins[i] or state[i] == _MUTABLE))

    def reset(self) -> None:
        """Drop every cached block; refuses (InvalidBlockError, nothing changed) while any block is held."""
        self._check_open()
        with self._lock:
            self._drain_pending()
            held = self._held_locked()
            if held:
                raise InvalidBlockError(f"cannot reset the {self.tier} pool: {held} blocks are held or pinned")
            dropped = [(h, s) for h, s in self._by_hash.items()]
            self._by_hash.clear()
            self._children.clear()
            self.policy.clear()
            for _, slot in dropped:
                self._state[slot] = _FREE
                self._slot_hash[slot] = None
            self._free = list(range(self._n - 1, -1, -1))
            if dropped:
                self._removed_locked([h for h, _ in dropped], [s for _, s in dropped])

    def compact(self) -> int:
        """Move stored blocks into the lowest slots so the storage can shrink (the disk tier); returns the moves.

        Blocks that are held, pinned or being filled stay where they are. Registrations wait meanwhile.

        Raises:
            BlockPoolError: this tier's storage cannot compact (memory tiers have nothing to shrink).
        """
        compact = getattr(self.storage, "compact", None)
        if compact is None:
            raise BlockPoolError(f"the {self.tier} tier has no storage to compact")
        self._check_open()
        lock = self._register_lock or threading.Lock()
        with lock, self._lock:
            self._drain_pending()
            state, refs, pins = self._state, self._refs, self._pins
            busy = [i for i in range(self._n) if state[i] == _MUTABLE or refs[i] or pins[i] or state[i] == _DOOMED]
            moves = compact(busy)
            for h, (old, new) in moves.items():
                if self._by_hash.get(h) != old:
                    continue
                self._by_hash[h] = new
                self._slot_hash[new], self._slot_hash[old] = h, None
                self._tokens[new], self._tokens[old] = self._tokens[old], None
                self._parents[new], self._parents[old] = self._parents[old], None
                state[new], state[old] = _REGISTERED, _FREE
                self._gen[new] += 1
                self._gen[old] += 1
            # Slots whose rows the storage dropped as corrupt while moving are gone too.
            stored = getattr(self.storage, "stored_hashes", None)
            if stored is not None:
                alive = stored()
                lost = [h for h in self._by_hash if h not in alive and refs[self._by_hash[h]] == 0]
                for h in lost:
                    slot = self._by_hash.pop(h)
                    self._unlink(h, slot)
                    self.policy.remove(h)
                    state[slot] = _FREE
                    self._slot_hash[slot] = None
                self.metrics.corrupt += len(lost)
                if lost:  # reported like any removal (the storage dropped their rows already)
                    self._removed_locked(lost, None)
            used = {i for i in range(self._n) if state[i] != _FREE}
            self._free = [i for i in range(self._n - 1, -1, -1) if i not in used]
            return len(moves)

    # ------------------------------------------------------------------------------------------------- helpers
    def restore(self, entries: Iterable[tuple[bytes, int, bytes | None, bytes | None]]) -> None:
        """Rebuild the index from stored ``(hash, slot, tokens, parent)`` rows, oldest first (disk tier at open)."""
        with self._lock:
            used = set()
            for h, slot, toks, *rest in entries:
                if not 0 <= slot < self._n or slot in used or h in self._by_hash:
                    continue
                used.add(slot)
                self._by_hash[h] = slot
                self._slot_hash[slot] = h
                self._tokens[slot] = toks
                par = rest[0] if rest else None
                self._parents[slot] = par
                if par is not None:
                    _add_child(self._children, par, h)
                self._state[slot] = _REGISTERED
                self.policy.insert(h, True)
            self._free = [s for s in range(self._n - 1, -1, -1) if s not in used]

    def validate_hashes(self, hashes: Sequence[bytes], argument: str) -> list[bytes]:
        """``hashes`` as a list of plain ``bytes`` of this pool's hash length (see :func:`hashing.plain_hashes`).

        Raises:
            ValueError: not a sequence of hashes, or a hash of another type or length (named by ``argument[i]``).
        """
        return plain_hashes(hashes, self.hash_length, argument)

    def _check_open(self) -> None:
        if self._closed():
            from .errors import ShutdownError

            raise ShutdownError(f"the {self.tier} pool's manager is closed")

    def __repr__(self) -> str:
        return f"BlockPool({self.tier}, {self._n} blocks, {len(self._by_hash)} cached)"

    def trigger_eviction(self, mode: str = "normal") -> int:
        """Evict inactive blocks now (the manager demotes them as usual); returns how many were evicted.

        Args:
            mode: ``EvictionMode.NORMAL`` / ``"normal"`` frees inactive blocks until a quarter of the pool is free;
                ``EvictionMode.AGGRESSIVE`` / ``"aggressive"`` evicts every inactive block.

        Raises:
            ValueError: an unknown mode.
        """
        mode = plain(mode)
        if mode not in ("normal", "aggressive"):
            raise ValueError(f"mode must be EvictionMode.NORMAL/'normal' or EvictionMode.AGGRESSIVE/'aggressive', "
                             f"got {mode!r}")
        self._check_open()
        if mode == "aggressive":
            count = self._n
        else:
            with self._lock:
                count = max(0, self._n // 4 - len(self._free))
        return len(self.evict_inactive(count))

    def hash_of(self, block_id: int) -> bytes | None:
        """The sequence hash a slot is registered under, or None (free, mutable, or dropped from the index)."""
        if not 0 <= block_id < self._n:
            raise IndexError(f"block_id must be in [0, {self._n}), got {block_id}")
        with self._lock:
            h = self._slot_hash[block_id]
            return h if h is not None and self._by_hash.get(h) == block_id else None
