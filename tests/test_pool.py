"""BlockPool bookkeeping: lifecycle, dedup, refcounts, pinning, eviction, bad input, async, GC."""

from __future__ import annotations

import asyncio
import gc
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvdata import SMALL, block_data, content_for, fill, hashes

from tiered_kv import (
    BlockNotComplete,
    BlockState,
    InvalidBlockError,
    ModelConfig,
    NotEnoughBlocksAvailable,
    UnreleasedBlockWarning,
)
from tiered_kv.policies import LRUPolicy, create_policy
from tiered_kv.pool import BlockPool
from tiered_kv.storage.memory import TensorArena


def make_pool(
    n: int = 8, policy: str = "arc", layout: str = "fully_contiguous", model: ModelConfig = SMALL
) -> BlockPool:
    arena = TensorArena("device", model, n, layout, "cpu")
    return BlockPool("device", arena, create_policy(policy, n), 32)


def register(pool: BlockPool, hs: list[bytes]) -> list:
    blocks = pool.allocate_blocks(len(hs))
    for b, h in zip(blocks, hs):
        fill(b, h)
    return pool.register_blocks(blocks, hs)


@pytest.mark.parametrize("layout", ["fully_contiguous", "layer_separate"])
def test_lifecycle_and_bytes(layout: str) -> None:
    pool = make_pool(layout=layout)
    hs = hashes(4)
    imm = register(pool, hs)
    assert [b.sequence_hash for b in imm] == hs
    assert pool.available_blocks() == 4
    for b in imm:
        b.release()
    assert pool.available_blocks() == 8
    got = pool.match_sequence_hashes(hs)
    assert len(got) == 4
    for b, h in zip(got, hs):
        assert torch.equal(block_data(b), content_for(h))
        assert b.tier == "device"
    pool.release_blocks(got)


def test_match_is_a_prefix_and_counts_hits() -> None:
    pool = make_pool()
    hs = hashes(5)
    pool.release_blocks(register(pool, hs[:2] + hs[3:]))
    got = pool.match_sequence_hashes(hs)
    assert [b.sequence_hash for b in got] == hs[:2]
    assert pool.metrics.hits == 2 and pool.metrics.misses == 1
    assert pool.cache_hit_rate() == pytest.approx(2 / 3)
    pool.release_blocks(got)


def test_dedup_returns_existing_and_frees_new() -> None:
    pool = make_pool(4)
    hs = hashes(1)
    first = register(pool, hs)
    second = register(pool, hs)
    assert second[0].block_id == first[0].block_id
    assert pool.available_blocks() == 3  # one slot held by two references, the duplicate slot freed
    first[0].release()
    assert pool.available_blocks() == 3
    second[0].release()
    assert pool.available_blocks() == 4


def test_each_match_is_a_separate_reference() -> None:
    pool = make_pool(2)
    hs = hashes(1)
    pool.release_blocks(register(pool, hs))
    a = pool.match_sequence_hashes(hs)[0]
    b = pool.match_sequence_hashes(hs)[0]
    a.release()
    a.release()  # idempotent: does not drop b's reference
    assert pool.block_state(b.block_id) is BlockState.ALLOCATED
    b.release()
    assert pool.block_state(b.block_id) is BlockState.CACHED


def test_allocate_all_or_nothing() -> None:
    pool = make_pool(4)
    held = pool.allocate_blocks(3)
    with pytest.raises(NotEnoughBlocksAvailable) as err:
        pool.allocate_blocks(2)
    assert err.value.requested == 2 and err.value.available == 1
    assert pool.available_blocks() == 1
    pool.release_blocks(held)
    assert pool.available_blocks() == 4


def test_eviction_reuses_inactive_and_never_active_or_pinned() -> None:
    pool = make_pool(4, policy="lru")
    hs = hashes(6)
    active = register(pool, hs[:1])
    inactive = register(pool, hs[1:4])
    pool.pin_blocks([inactive[0]])
    pool.release_blocks(inactive)
    assert pool.available_blocks() == 2
    pool.release_blocks(register(pool, hs[4:6]))  # evicts hs[2], hs[3]
    assert hs[0] in pool and hs[1] in pool and hs[2] not in pool and hs[3] not in pool
    assert pool.metrics.evictions == 2
    assert [e.sequence_hash for e in pool.metrics.recent_evictions()] == hs[2:4]
    assert pool.block_state(active[0].block_id) is BlockState.ALLOCATED
    assert pool.block_state(pool.match_sequence_hashes(hs[1:2])[0].block_id) is BlockState.PINNED
    with pytest.raises(NotEnoughBlocksAvailable):
        pool.allocate_blocks(3)


def test_unpin_errors_and_restores_evictability() -> None:
    pool = make_pool(2)
    hs = hashes(1)
    pool.release_blocks(register(pool, hs))
    pool.pin_blocks(hs)
    assert pool.available_blocks() == 1
    pool.unpin_blocks(hs)
    assert pool.available_blocks() == 2
    with pytest.raises(InvalidBlockError, match="not pinned"):
        pool.unpin_blocks(hs)
    with pytest.raises(InvalidBlockError, match="not registered"):
        pool.pin_blocks([hashes(1, seed=9)[0]])


def test_released_handle_raises_and_keeps_attributes() -> None:
    pool = make_pool()
    hs = hashes(1)
    b = register(pool, hs)[0]
    b.release()
    assert b.block_id >= 0 and b.tier == "device" and b.sequence_hash == hs[0]
    with pytest.raises(InvalidBlockError):
        b.layer_view(0, 0)
    m = pool.allocate_blocks(1)[0]
    m.release()
    with pytest.raises(InvalidBlockError):
        m.layer_view(0, 0)


def test_immutable_view_is_a_copy() -> None:
    pool = make_pool()
    hs = hashes(1)
    b = register(pool, hs)[0]
    v = b.layer_view(0, 0)
    v.fill_(123.0)
    assert torch.equal(block_data(b), content_for(hs[0]))


def test_context_managers_release() -> None:
    pool = make_pool(2)
    with pool.allocate_blocks(1)[0] as m:
        assert pool.available_blocks() == 1
    assert m.released and pool.available_blocks() == 2


def test_gc_releases_with_warning() -> None:
    pool = make_pool(2)
    blocks = pool.allocate_blocks(2)
    with pytest.warns(UnreleasedBlockWarning):
        del blocks
        gc.collect()
    assert pool.available_blocks() == 2


@pytest.mark.parametrize(
    ("hs", "match"),
    [
        ("abc", "sequence_hashes"),
        ([b"x" * 16], r"sequence_hashes\[0\]: expected 32 bytes, got 16"),
        ([123], r"sequence_hashes\[0\]"),
    ],
)
def test_bad_hashes_leave_pool_unchanged(hs: object, match: str) -> None:
    pool = make_pool(4)
    blocks = pool.allocate_blocks(1)
    with pytest.raises(ValueError, match=match):
        pool.register_blocks(blocks, hs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match):
        pool.match_sequence_hashes(hs)  # type: ignore[arg-type]
    assert pool.available_blocks() == 3 and len(pool) == 0
    assert not blocks[0].released


def test_register_misuse() -> None:
    pool = make_pool(4)
    other = make_pool(4)
    hs = hashes(2)
    blocks = pool.allocate_blocks(2)
    with pytest.raises(ValueError, match="differ in length"):
        pool.register_blocks(blocks, hs[:1])
    with pytest.raises(InvalidBlockError, match="appears twice"):
        pool.register_blocks([blocks[0], blocks[0]], hs)
    with pytest.raises(InvalidBlockError, match="pool"):
        other.register_blocks(blocks, hs)
    with pytest.raises(BlockNotComplete, match=r"blocks\[0\]: device:\d was never written"):
        pool.register_blocks(blocks, hs)  # seed 001: nothing was written into them yet
    assert len(pool) == 0
    for b in blocks:
        b.write(0, 0, torch.zeros(SMALL.page_size, SMALL.inner_dim, dtype=SMALL.torch_dtype))
    imm = pool.register_blocks(blocks, hs)
    with pytest.raises(InvalidBlockError, match="released or registered"):
        pool.register_blocks(blocks, hs)  # consumed handles
    with pytest.raises(InvalidBlockError, match="MutableBlock"):
        pool.register_blocks(imm, hs)  # type: ignore[arg-type]
    assert len(pool) == 2 and pool.available_blocks() == 2
    with pytest.raises(ValueError, match="non-negative"):
        pool.allocate_blocks(-1)


def test_write_checks_shape_and_dtype() -> None:
    pool = make_pool(2)
    m = pool.allocate_blocks(1)[0]
    with pytest.raises(ValueError, match="shape"):
        m.write(0, 0, torch.zeros(SMALL.inner_dim))
    with pytest.raises(ValueError, match="dtype"):
        m.write(0, 0, torch.zeros(SMALL.page_size, SMALL.inner_dim, dtype=torch.float64))
    with pytest.raises(IndexError, match="layer"):
        m.layer_view(5, 0)
    m.write(1, 1, torch.ones(SMALL.page_size, SMALL.inner_dim))
    assert torch.equal(m.layer_view(1, 1), torch.ones(SMALL.page_size, SMALL.inner_dim))


def test_misbehaving_policy_is_caught() -> None:
    class Liar(LRUPolicy):
        def evict(self):  # type: ignore[no-untyped-def]
            return b"\0" * 32

    arena = TensorArena("device", SMALL, 2, "fully_contiguous", "cpu")
    pool = BlockPool("device", arena, Liar(2), 32)
    pool.release_blocks(register(pool, hashes(2)))
    with pytest.raises(InvalidBlockError, match="not an evictable block"):
        pool.allocate_blocks(1)
    assert len(pool) == 2


def test_async_allocate_waits_for_release() -> None:
    pool = make_pool(2)
    held = pool.allocate_blocks(2)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, pool.release_blocks, held)
        got = await pool.allocate_blocks_async(2, timeout=2.0)
        assert len(got) == 2
        with pytest.raises(NotEnoughBlocksAvailable):
            await pool.allocate_blocks_async(1, timeout=0.05)
        with pytest.raises(NotEnoughBlocksAvailable):
            await pool.allocate_blocks_async(1)

    asyncio.run(main())


def test_reset_refuses_while_held() -> None:
    pool = make_pool(4)
    imm = register(pool, hashes(2))
    with pytest.raises(InvalidBlockError, match="held"):
        pool.reset()
    assert len(pool) == 2
    pool.release_blocks(imm)
    pool.reset()
    assert len(pool) == 0 and pool.available_blocks() == 4


def test_threads_hammer_pool_without_losing_blocks() -> None:
    pool = make_pool(32)
    hs = hashes(64)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        import random

        rng = random.Random(seed)
        try:
            for _ in range(300):
                start = rng.randrange(0, 60)
                got = pool.match_sequence_hashes(hs[start : start + 4])
                for b in got:
                    assert torch.equal(block_data(b), content_for(b.sequence_hash))
                missing = hs[start + len(got) : start + 4]
                try:
                    new = pool.allocate_blocks(len(missing))
                except NotEnoughBlocksAvailable:
                    pool.release_blocks(got)
                    continue
                for b, h in zip(new, missing):
                    fill(b, h)
                pool.release_blocks(got + pool.register_blocks(new, missing))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert pool.available_blocks() == 32
    assert pool.policy.evictable_count() == len(pool)


def _check_children_index(pool: BlockPool) -> None:
    """The raw parent -> children index: one child kept as itself, two or more as a set, each entry exactly the
    registered blocks that name that parent (no stale key, no empty or one-element set)."""
    want: dict[bytes, set[bytes]] = {}
    for h, slot in pool._by_hash.items():
        parent = pool._parents[slot]
        if parent is not None:
            want.setdefault(parent, set()).add(h)
    got: dict[bytes, set[bytes]] = {}
    for parent, kids in pool._children.items():
        if isinstance(kids, bytes):
            got[parent] = {kids}
        else:
            assert isinstance(kids, set) and len(kids) >= 2, (parent.hex(), kids)
            got[parent] = set(kids)
    assert got == want


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["chain", "branch", "branch", "again", "hold", "invalidate", "evict",
                                           "reset"]), st.integers(0, 7)), max_size=60))
def test_children_index_matches_the_registered_parents(ops: list[tuple[str, int]]) -> None:
    """Through branching, re-registration (dedup), held and invalidated blocks, eviction and reset, the children
    index lists exactly the registered blocks that name each parent, in its compact form."""
    pool = make_pool(n=6, policy="lru")
    seen: list[bytes] = []
    parent_of: dict[bytes, bytes | None] = {}
    held: list = []
    fresh = iter(hashes(200))
    for op, k in ops:
        if op in ("chain", "branch", "again"):
            if op == "again" and seen:
                h = seen[k % len(seen)]  # already registered (dedup) or gone (registered anew)
                parent = parent_of[h]
            else:
                parent = seen[k % len(seen)] if seen and op == "branch" else (seen[-1] if seen else None)
                h = next(fresh)
            if parent is not None and parent not in pool:
                parent = None
            blocks = pool.allocate_up_to(1)
            if not blocks:
                continue
            fill(blocks[0], h)
            got = pool.register_blocks(blocks, [h], parents=[parent])
            if op == "again" and k % 2:
                held += got  # kept while later ops run
            else:
                pool.release_blocks(got)
            if h not in parent_of:
                seen.append(h)
                parent_of[h] = parent
        elif op == "hold" and seen:
            held += pool.match_sequence_hashes([seen[k % len(seen)]])
        elif op == "invalidate" and seen:
            pool.invalidate([seen[k % len(seen)]])
        elif op == "evict":
            pool.evict_inactive(1 + k % 3)
        elif op == "reset":
            pool.release_blocks(held)
            held = []
            pool.reset()
        _check_children_index(pool)
        present = pool.holding(seen)
        for p in seen:
            expected = sorted(c for c in present if pool.parent_of(c) == p)
            assert sorted(pool.children_of(p)) == expected, p.hex()
    pool.release_blocks(held)


def test_a_registered_chain_costs_no_container_per_block() -> None:
    """Each registered block's bookkeeping is slots in preallocated lists and one dict entry per index: a chain of
    2,000 blocks adds no GC-tracked container per block (a set per parent did: 216 bytes and a GC visit each)."""
    n = 2000
    pool = make_pool(n=n, model=ModelConfig(num_layers=1, inner_dim=8, page_size=4, dtype="float16"))
    hs = hashes(n)
    gc.collect()
    before = len(gc.get_objects())
    blocks = pool.allocate_blocks(n)
    pool.scatter(blocks, torch.zeros((n, *pool.model.block_shape), dtype=pool.model.torch_dtype))
    pool.release_blocks(pool.register_blocks(blocks, hs, parents=[None, *hs[:-1]]))
    del blocks
    gc.collect()
    assert len(pool.children_of(hs[0])) == 1
    assert len(gc.get_objects()) - before < n // 10


@pytest.mark.parametrize("only_parents", [False, True])
def test_removal_hook_reports_what_a_pool_alone_needs(only_parents: bool) -> None:
    """A pool that is the whole hierarchy reports only removed hashes with children here (nothing else can be left
    unreachable); otherwise every removed hash, since other tiers may hold its children."""
    pool = make_pool(n=4, policy="lru")
    reported: list[bytes] = []
    pool.set_removal_hook(reported.extend, only_parents=only_parents)
    a, b, c, d = hashes(4)
    for h, parent in ((a, None), (b, a), (c, None), (d, None)):
        blocks = pool.allocate_blocks(1)
        fill(blocks[0], h)
        pool.release_blocks(pool.register_blocks(blocks, [h], parents=[parent]))
    blocks = pool.allocate_blocks(1)  # evicts a (least recent), whose child b is still here
    assert reported == [a]
    pool.release_blocks(blocks)
    reported.clear()
    pool.invalidate([c])  # no children anywhere
    assert reported == ([] if only_parents else [c])
    reported.clear()
    pool.evict_inactive(4)
    assert sorted(reported) == ([] if only_parents else sorted([b, d]))
