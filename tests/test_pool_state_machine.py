"""A Hypothesis state machine: BlockPool + policy against a plain dict model.

Invariants after every step: free + used == total; refcounts never negative; pinned and referenced blocks are
never evicted; every matched block's bytes equal what was registered under its hash.
"""

from __future__ import annotations

import hypothesis.strategies as st
import torch
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from kvdata import SMALL, block_data, content_for, fill, hashes

from tiered_kv import NotEnoughBlocksAvailable
from tiered_kv.policies import create_policy
from tiered_kv.pool import BlockPool
from tiered_kv.storage.memory import TensorArena

CAPACITY = 6
HASHES = hashes(12, seed=3)


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.policy_name = "arc"
        arena = TensorArena("host", SMALL, CAPACITY, "fully_contiguous", "cpu")
        self.pool = BlockPool("host", arena, create_policy(self.policy_name, CAPACITY), 32)
        self.mutable: list = []  # filled MutableBlocks with the hash they will get
        self.held: list = []  # ImmutableBlocks we hold
        self.pinned: dict[bytes, int] = {}
        self.known: set[bytes] = set()  # registered at some point (may since be evicted)

    @rule(k=st.integers(1, 3), data=st.data())
    def allocate(self, k: int, data: st.DataObject) -> None:
        before = set(self.pool.cached_hashes())
        try:
            blocks = self.pool.allocate_blocks(k)
        except NotEnoughBlocksAvailable as exc:
            assert exc.available < k
            assert set(self.pool.cached_hashes()) == before  # nothing changed
            return
        evicted = before - set(self.pool.cached_hashes())
        held_hashes = {b.sequence_hash for b in self.held}
        assert not evicted & held_hashes, "a referenced block was evicted"
        assert not evicted & set(self.pinned), "a pinned block was evicted"
        for b in blocks:
            h = data.draw(st.sampled_from(HASHES))
            fill(b, h)
            self.mutable.append((b, h))

    @precondition(lambda self: self.mutable)
    @rule(n=st.integers(1, 3))
    def register(self, n: int) -> None:
        batch, self.mutable = self.mutable[:n], self.mutable[n:]
        out = self.pool.register_blocks([b for b, _ in batch], [h for _, h in batch])
        for blk, (_, h) in zip(out, batch):
            assert blk.sequence_hash == h
            assert torch.equal(block_data(blk), content_for(h)), "dedup returned a block with other bytes"
            self.known.add(h)
        self.held.extend(out)

    @precondition(lambda self: self.mutable)
    @rule()
    def drop_mutable(self) -> None:
        b, _ = self.mutable.pop()
        b.release()

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 100))
    def release(self, i: int) -> None:
        b = self.held.pop(i % len(self.held))
        b.release()
        b.release()  # idempotent

    @rule(start=st.integers(0, 11), n=st.integers(1, 5))
    def match(self, start: int, n: int) -> None:
        want = HASHES[start : start + n]
        cached = set(self.pool.cached_hashes())
        expected = 0
        for h in want:
            if h not in cached:
                break
            expected += 1
        got = self.pool.match_sequence_hashes(want)
        assert [b.sequence_hash for b in got] == want[:expected]
        for b in got:
            assert torch.equal(block_data(b), content_for(b.sequence_hash))
        self.held.extend(got)

    @precondition(lambda self: len(self.pool) > 0)
    @rule(i=st.integers(0, 100))
    def pin(self, i: int) -> None:
        cached = sorted(self.pool.cached_hashes())
        h = cached[i % len(cached)]  # held or inactive
        self.pool.pin_blocks([h])
        self.pinned[h] = self.pinned.get(h, 0) + 1

    @precondition(lambda self: self.pinned)
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        h = data.draw(st.sampled_from(sorted(self.pinned)))
        self.pool.unpin_blocks([h])
        self.pinned[h] -= 1
        if not self.pinned[h]:
            del self.pinned[h]

    @invariant()
    def accounting(self) -> None:
        pool = self.pool
        stats = pool.stats()
        assert stats["free_blocks"] + stats["cached_blocks"] + stats["mutable_blocks"] == CAPACITY
        assert stats["mutable_blocks"] == len(self.mutable)
        assert all(r >= 0 for r in pool._refs)
        for h in {b.sequence_hash for b in self.held} | set(self.pinned):
            assert h in pool, "a held or pinned block is no longer matchable"
        refs: dict[int, int] = {}
        for b in self.held:
            refs[b.block_id] = refs.get(b.block_id, 0) + 1
        for slot, r in refs.items():
            assert pool._refs[slot] == r
        evictable = sum(1 for h in pool.cached_hashes() if pool._refs[pool._by_hash[h]] == 0 and h not in self.pinned)
        assert pool.policy.evictable_count() == evictable
        assert stats["available_blocks"] == stats["free_blocks"] + evictable


class LruPoolMachine(PoolMachine):
    def __init__(self) -> None:
        super().__init__()
        arena = TensorArena("host", SMALL, CAPACITY, "layer_separate", "cpu")
        self.pool = BlockPool("host", arena, create_policy("lru", CAPACITY), 32)


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestLruPoolMachine = LruPoolMachine.TestCase
TestLruPoolMachine.settings = settings(max_examples=30, stateful_step_count=40, deadline=None)
