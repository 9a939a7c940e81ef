"""A Hypothesis state machine for one block pool, checked against a plain dict model through the public API only.

The model is the machine's own: which hashes are cached in which slot, with how many references and pins, which
mutable blocks are outstanding, and which bytes each hash was registered with. The pool is asked only what a
user may ask (``allocate_blocks``, ``register_blocks``, ``match_sequence_hashes``, ``release``, ``pin_blocks`` /
``unpin_blocks``, ``touch``, ``reset``, ``holds``, ``block_state``, ``stats``, ``available_blocks``); its answers are
compared with the model, never used as the model.

The only choice the model leaves to the pool is which evictable blocks an allocation evicts (that is the policy's
to make): the machine learns it by asking ``holds()`` of every cached hash, then checks it: exactly as many victims
as the allocation needed beyond the free slots, each of them evictable (never referenced, pinned or mutable), and
with ``reference_lru`` the least recently used ones. Invariants after every step: free + used == total, every
slot's state (free, allocated, cached, pinned) is the model's, refcounts never go below zero (a double release is a
no-op), and every matched block's bytes are the bytes registered first under its hash (a deduplicated
registration keeps the first block).

Run it on a pool of your own configuration::

    from tiered_kv.testing import PoolStateMachine

    class MyPoolMachine(PoolStateMachine):
        def make_manager(self) -> KvBlockManager:        # one tier: the pool under test is its only pool
            return KvBlockManager(KvBlockManagerConfig(model=self.model, host=LayoutConfig(num_blocks=self.capacity),
                                                       eviction="mine", device_type="cpu"))

    TestMyPool = MyPoolMachine.TestCase

Needs hypothesis (``pip install tiered_kv[testing]``).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from typing import ClassVar

import hypothesis.strategies as st
import torch
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ..blocks import ImmutableBlock, MutableBlock
from ..config import DiskConfig, KvBlockManagerConfig, LayoutConfig, ModelConfig
from ..errors import InvalidBlockError, NotEnoughBlocksAvailable
from ..manager import KvBlockManager
from ..pool import BlockPool, BlockState
from ._data import SMALL_MODEL, block_bytes, hashes, same

__all__ = ["DiskPoolStateMachine", "PoolStateMachine"]

N_HASHES = 10
HASHES = hashes("pool-machine", N_HASHES)


@dataclass
class _Entry:
    slot: int
    content: bytes  # the key of the bytes registered first: block_bytes(content)
    refs: int = 0
    pins: int = 0
    used: int = 0  # logical time it last became evictable or was touched while evictable (LRU order)


def _content(h: bytes, version: int, model: ModelConfig) -> torch.Tensor:
    return block_bytes(h + bytes([version]), model)


def _read(block: ImmutableBlock, model: ModelConfig) -> torch.Tensor:
    return torch.stack([
        torch.stack([block.layer_view(layer, outer) for outer in range(model.outer_dim)])
        for layer in range(model.num_layers)
    ])


class PoolStateMachine(RuleBasedStateMachine):
    """One pool of :attr:`capacity` slots (a host tier by default) against the dict model; see the module docstring.

    Subclasses override :meth:`make_manager` (any single-tier manager) and :meth:`pool_of`, and set
    :attr:`reference_lru` when the pool's policy is LRU.
    """

    capacity: ClassVar[int] = 4
    model: ClassVar[ModelConfig] = SMALL_MODEL
    #: The pool's policy is least recently used: victims must be exactly the LRU evictable blocks.
    reference_lru: ClassVar[bool] = False
    #: The pool's policy evicts (False for the "none" policy: cached blocks stay until reset).
    evicts: ClassVar[bool] = True
    policy: ClassVar[str] = "arc"
    layout: ClassVar[str] = "fully_contiguous"

    def __init__(self) -> None:
        super().__init__()
        self.bm = self.make_manager()
        self.pool = self.pool_of(self.bm)
        self.cached: dict[bytes, _Entry] = {}
        self.mutable: list[tuple[MutableBlock, bytes, int]] = []  # (block, hash it will get, content version)
        self.handles: list[ImmutableBlock] = []
        self.clock = 0

    # -- what subclasses choose ----------------------------------------------------------------------------------
    def make_manager(self) -> KvBlockManager:
        """A manager with one tier of :attr:`capacity` blocks (the default: host, :attr:`layout`, :attr:`policy`)."""
        return KvBlockManager(KvBlockManagerConfig(
            model=self.model, host=LayoutConfig(num_blocks=self.capacity, layout=self.layout),
            eviction=self.policy, device_type="cpu",
        ))

    def pool_of(self, bm: KvBlockManager) -> BlockPool:
        """The pool under test."""
        pool = bm.host()
        assert pool is not None
        return pool

    def teardown(self) -> None:
        for b in self.handles:
            b.release()
        for m, _, _ in self.mutable:
            m.release()
        self.bm.close()

    # -- model helpers -------------------------------------------------------------------------------------------
    def _tick(self) -> int:
        self.clock += 1
        return self.clock

    def _free(self) -> int:
        return self.capacity - len(self.mutable) - len(self.cached)

    def _evictable(self) -> list[bytes]:
        if not self.evicts:
            return []
        return [h for h, e in self.cached.items() if e.refs == 0 and e.pins == 0]

    def _unhold(self, h: bytes) -> None:
        e = self.cached[h]
        if e.refs == 0 and e.pins == 0:
            e.used = self._tick()

    # -- rules ---------------------------------------------------------------------------------------------------
    @rule(k=st.integers(1, 3), data=st.data())
    def allocate(self, k: int, data: st.DataObject) -> None:
        free, evictable = self._free(), self._evictable()
        if k > free + len(evictable):
            try:
                self.pool.allocate_blocks(k)
            except NotEnoughBlocksAvailable as exc:
                assert (exc.requested, exc.available) == (k, free + len(evictable))
            else:
                raise AssertionError(f"allocate_blocks({k}) succeeded with {free} free + {len(evictable)} evictable")
            for h in self.cached:
                assert self.pool.holds(h), "a refused allocation evicted a block"
            return
        blocks = self.pool.allocate_blocks(k)
        assert len(blocks) == k
        gone = [h for h in self.cached if not self.pool.holds(h)]
        need = max(0, k - free)
        assert len(gone) == need, f"allocate_blocks({k}) with {free} free evicted {len(gone)} blocks, not {need}"
        for h in gone:
            assert h in evictable, f"a held (referenced, pinned) block {h.hex()[:12]} was evicted"
        if self.reference_lru:
            lru = sorted(evictable, key=lambda h: self.cached[h].used)[:need]
            assert set(gone) == set(lru), "the victims are not the least recently used blocks"
        for h in gone:
            del self.cached[h]
        taken = {e.slot for e in self.cached.values()} | {b.block_id for b, _, _ in self.mutable}
        ids = [b.block_id for b in blocks]
        assert len(set(ids)) == k and not set(ids) & taken, f"allocated slots {ids} are in use ({sorted(taken)})"
        for b in blocks:
            h = data.draw(st.sampled_from(HASHES))
            version = data.draw(st.integers(0, 1))
            content = _content(h, version, self.model)
            for layer in range(self.model.num_layers):
                for outer in range(self.model.outer_dim):
                    b.layer_view(layer, outer).copy_(content[layer, outer])
            self.mutable.append((b, h, version))

    @rule(k=st.integers(1, 2), data=st.data())
    def store(self, k: int, data: st.DataObject) -> None:
        """Allocate, fill, register and release (a prefill's blocks cached for later): what makes victims."""
        before = len(self.mutable)
        self.allocate(k, data)
        if len(self.mutable) > before:
            self.mutable = self.mutable[before:] + self.mutable[:before]  # register the new ones first
            self.register(len(self.mutable) - before, release=True)

    @precondition(lambda self: self.mutable)
    @rule(n=st.integers(1, 3), release=st.booleans())
    def register(self, n: int, release: bool = False) -> None:
        batch, self.mutable = self.mutable[:n], self.mutable[n:]
        out = self.pool.register_blocks([b for b, _, _ in batch], [h for _, h, _ in batch])
        assert len(out) == len(batch)
        for blk, (mut, h, version) in zip(out, batch):
            assert blk.sequence_hash == h
            e = self.cached.get(h)
            if e is None:  # a new hash: the mutable block's slot holds it now
                assert blk.block_id == mut.block_id
                e = self.cached[h] = _Entry(mut.block_id, h + bytes([version]))
            else:  # deduplicated: the first registration's block, bytes and slot
                assert blk.block_id == e.slot, "a deduplicated registration did not return the existing block"
            e.refs += 1
            self.handles.append(blk)
        for blk in out:
            assert same(_read(blk, self.model), block_bytes(self.cached[blk.sequence_hash].content, self.model))
        if release:
            for blk in out:
                self.release_handle(blk)

    @precondition(lambda self: self.mutable)
    @rule(i=st.integers(0, 10))
    def drop_mutable(self, i: int) -> None:
        b, _, _ = self.mutable.pop(i % len(self.mutable))
        b.release()
        b.release()  # idempotent

    @precondition(lambda self: self.handles)
    @rule(i=st.integers(0, 100))
    def release(self, i: int) -> None:
        self.release_handle(self.handles[i % len(self.handles)])

    def release_handle(self, b: ImmutableBlock) -> None:
        del self.handles[next(i for i, x in enumerate(self.handles) if x is b)]
        b.release()
        b.release()  # idempotent: a second release must not drop another holder's reference
        e = self.cached[b.sequence_hash]
        e.refs -= 1
        assert e.refs >= 0
        self._unhold(b.sequence_hash)

    @rule(start=st.integers(0, N_HASHES - 1), n=st.integers(1, 5))
    def match(self, start: int, n: int) -> None:
        want = HASHES[start : start + n]
        expected = []
        for h in want:
            if h not in self.cached:
                break
            expected.append(h)
        got = self.pool.match_sequence_hashes(want)
        assert [b.sequence_hash for b in got] == expected, "the match is not the model's longest cached prefix"
        for b in got:
            e = self.cached[b.sequence_hash]
            assert b.block_id == e.slot
            assert same(_read(b, self.model), block_bytes(e.content, self.model)), "a matched block's bytes differ"
            e.refs += 1
            self.handles.append(b)

    @precondition(lambda self: self.cached)
    @rule(i=st.integers(0, 100))
    def pin(self, i: int) -> None:
        h = sorted(self.cached)[i % len(self.cached)]
        self.pool.pin_blocks([h])
        self.cached[h].pins += 1

    @precondition(lambda self: any(e.pins for e in self.cached.values()))
    @rule(i=st.integers(0, 100))
    def unpin(self, i: int) -> None:
        pinned = sorted(h for h, e in self.cached.items() if e.pins)
        h = pinned[i % len(pinned)]
        self.pool.unpin_blocks([h])
        self.cached[h].pins -= 1
        self._unhold(h)

    @rule(i=st.integers(0, N_HASHES - 1))
    def unpin_unpinned_is_refused(self, i: int) -> None:
        h = HASHES[i]
        e = self.cached.get(h)
        if e is None or e.pins == 0:
            try:
                self.pool.unpin_blocks([h])
            except InvalidBlockError:
                return
            raise AssertionError("unpinning a block that is not pinned was accepted")

    @rule(start=st.integers(0, N_HASHES - 1), n=st.integers(1, 4))
    def touch(self, start: int, n: int) -> None:
        want = HASHES[start : start + n]
        assert self.pool.touch(want) == sum(h in self.cached for h in want)
        for h in want:
            if h in self.cached:
                self._unhold(h)  # a touch of an evictable block is a use; of a held one, nothing

    @rule()
    def reset(self) -> None:
        held = bool(self.mutable) or any(e.refs or e.pins for e in self.cached.values())
        if held:
            try:
                self.pool.reset()
            except InvalidBlockError:
                return
            raise AssertionError("reset() dropped blocks while some were held")
        self.pool.reset()
        self.cached.clear()

    # -- invariants ----------------------------------------------------------------------------------------------
    @invariant()
    def accounting(self) -> None:
        pool = self.pool
        free, evictable = self._free(), len(self._evictable())
        assert pool.total_blocks() == self.capacity
        assert free >= 0, "the model holds more blocks than the pool has slots"
        assert pool.available_blocks() == free + evictable
        stats = pool.stats()
        assert stats["free_blocks"] + stats["cached_blocks"] + stats["mutable_blocks"] == self.capacity
        assert (stats["free_blocks"], stats["cached_blocks"], stats["mutable_blocks"]) == (
            free, len(self.cached), len(self.mutable)
        )
        assert stats["inactive_blocks"] == evictable
        assert stats["pinned_blocks"] == sum(1 for e in self.cached.values() if e.pins)
        assert len(pool) == len(self.cached)

    @invariant()
    def slot_states(self) -> None:
        expected: dict[int, BlockState] = dict.fromkeys(range(self.capacity), BlockState.FREE)
        for b, _, _ in self.mutable:
            expected[b.block_id] = BlockState.ALLOCATED
        for h, e in self.cached.items():
            assert e.refs >= 0 and e.pins >= 0
            assert self.pool.holds(h), f"{h.hex()[:12]} left the pool unseen"
            expected[e.slot] = (
                BlockState.PINNED if e.pins else BlockState.ALLOCATED if e.refs else BlockState.CACHED
            )
        got = {slot: self.pool.block_state(slot) for slot in range(self.capacity)}
        assert got == expected


class DiskPoolStateMachine(PoolStateMachine):
    """The same machine on a disk-only manager (a fresh directory per example)."""

    capacity: ClassVar[int] = 4

    def make_manager(self) -> KvBlockManager:
        self.dir = tempfile.mkdtemp(prefix="tiered-kv-pool-machine-")
        return KvBlockManager(KvBlockManagerConfig(
            model=self.model,
            disk=DiskConfig(path=self.dir, num_blocks=self.capacity, backend="posix", durability="none"),
            eviction=self.policy, device_type="cpu",
        ))

    def pool_of(self, bm: KvBlockManager) -> BlockPool:
        pool = bm.disk()
        assert pool is not None
        return pool

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

