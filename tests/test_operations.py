"""Seed operations: swaps, copy_blocks, prefetch, reset, touch, token verification, custom policies."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from kvdata import SMALL, block_data, content_for, fill

from tiered_kv import (
    DiskConfig,
    InvalidBlockError,
    KvBlockManager,
    KvBlockManagerConfig,
    LayoutConfig,
    NotEnoughBlocksAvailable,
    compute_cache_keys,
    register_eviction_policy,
)
from tiered_kv.policies import LRUPolicy


def store(bm: KvBlockManager, hs: list[bytes], tokens: list[list[int]] | None = None) -> list:
    pool = bm.top
    blocks = pool.allocate_blocks(len(hs))
    for b, h in zip(blocks, hs):
        fill(b, h)
    return pool.register_blocks(blocks, hs, tokens)


def test_swap_out_and_in(two_tier: KvBlockManager) -> None:
    bm = two_tier
    hs = bm.sequence_hashes(list(range(12)))
    dev = store(bm, hs)
    host = bm.swap_out(dev)
    assert [b.tier for b in host] == ["host"] * 3 and [b.sequence_hash for b in host] == hs
    for b in host:
        assert torch.equal(block_data(b), content_for(b.sequence_hash))
    bm.top.release_blocks(dev)
    bm.trigger_eviction("aggressive")  # device copies gone (they were clean: no new host copy)
    assert not any(h in bm.top for h in hs)
    back = bm.swap_in(host)
    assert [b.tier for b in back] == ["device"] * 3
    for b in back:
        assert torch.equal(block_data(b), content_for(b.sequence_hash))
    again = asyncio.run(bm.swap_out_async(back))  # already on the host: no copy, same blocks
    assert [b.block_id for b in again] == [b.block_id for b in host]
    with pytest.raises(InvalidBlockError):
        bm.swap_in(back)  # device blocks are not host blocks
    for blocks in (host, back, again):
        for b in blocks:
            b.release()


def test_swap_in_all_or_nothing(two_tier: KvBlockManager) -> None:
    bm = two_tier
    host_pool = bm.host()
    assert host_pool is not None
    hs = bm.sequence_hashes(list(range(4 * 6)))
    blocks = host_pool.allocate_blocks(6)
    for b, h in zip(blocks, hs):
        fill(b, h)
    host = host_pool.register_blocks(blocks, hs)
    with pytest.raises(NotEnoughBlocksAvailable):
        bm.swap_in(host)  # 6 > 4 device blocks
    assert bm.top.available_blocks() == 4 and len(bm.top) == 0
    host_pool.release_blocks(host)


def test_copy_blocks_across_tiers(two_tier: KvBlockManager) -> None:
    bm = two_tier
    host_pool = bm.host()
    assert host_pool is not None
    hs = bm.sequence_hashes(list(range(8)))
    src = store(bm, hs)
    dst = host_pool.allocate_blocks(2)
    bm.copy_blocks(src, dst)
    for d, h in zip(dst, hs):
        assert torch.equal(block_data(d), content_for(h))
    with pytest.raises(ValueError, match="differ in length"):
        bm.copy_blocks(src, dst[:1])
    with pytest.raises(InvalidBlockError, match="dst_blocks"):
        bm.copy_blocks(src, src)  # type: ignore[arg-type]
    host_pool.release_blocks(dst)
    bm.top.release_blocks(src)


def test_prefetch_promotes_in_background(tmp_path: Path) -> None:
    cfg = KvBlockManagerConfig(
        model=SMALL,
        device=LayoutConfig(num_blocks=8),
        disk=DiskConfig(path=str(tmp_path), num_blocks=16, backend="posix"),
        device_type="cpu",
    )
    with KvBlockManager(cfg) as bm:
        disk = bm.disk()
        assert disk is not None
        hs = bm.sequence_hashes(list(range(4 * 4)))
        blocks = disk.allocate_blocks(4)
        for b, h in zip(blocks, hs):
            fill(b, h)
        disk.release_blocks(disk.register_blocks(blocks, hs))
        bm.prefetch(hs)
        assert bm.wait_for_prefetches(30)
        assert all(h in bm.top for h in hs)
        promotions = bm.metrics()["offload"]["promotions"]
        got = bm.match_sequence_hashes(hs)
        assert len(got) == 4 and bm.metrics()["offload"]["promotions"] == promotions  # not fetched twice
        for b in got:
            assert torch.equal(block_data(b), content_for(b.sequence_hash))
        bm.top.release_blocks(got)
        bm.prefetch(hs)  # queued work at close is cancelled cleanly


def test_reset_refuses_while_held_then_drops(tmp_path: Path) -> None:
    cfg = KvBlockManagerConfig(
        model=SMALL,
        device=LayoutConfig(num_blocks=4),
        disk=DiskConfig(path=str(tmp_path), num_blocks=16, backend="posix"),
        device_type="cpu",
    )
    with KvBlockManager(cfg) as bm:
        hs = bm.sequence_hashes(list(range(4 * 8)))
        held = store(bm, hs[:2])
        bm.top.release_blocks(held[1:])
        for i in range(2, 8, 2):
            bm.top.release_blocks(store(bm, hs[i : i + 2]))
        bm.flush()
        disk = bm.disk()
        assert disk is not None and len(disk) > 0
        with pytest.raises(InvalidBlockError, match="held"):
            bm.reset()
        assert len(disk) > 0 and len(bm.top) > 0  # nothing dropped anywhere
        bm.reset(tiers=["disk"])
        assert len(disk) == 0 and len(bm.top) > 0
        held[0].release()
        bm.reset()
        assert len(bm.top) == 0
    with KvBlockManager(cfg) as again:  # the disk rows are gone for good
        assert len(again.disk()) == 0  # type: ignore[arg-type]


def test_touch_refreshes_recency(two_tier: KvBlockManager) -> None:
    bm = KvBlockManager(
        KvBlockManagerConfig(model=SMALL, device=LayoutConfig(num_blocks=4), eviction="lru", device_type="cpu")
    )
    hs = bm.sequence_hashes(list(range(4 * 5)))
    bm.top.release_blocks(store(bm, hs[:4]))
    assert bm.top.touch(hs[:1]) == 1
    bm.top.release_blocks(store(bm, hs[4:5]))  # evicts the least recent: hs[1], not the touched hs[0]
    assert hs[0] in bm.top and hs[1] not in bm.top
    bm.close()


def test_token_verification_turns_collisions_into_misses(two_tier: KvBlockManager) -> None:
    bm = two_tier
    toks = list(range(8))
    hs = bm.sequence_hashes(toks)
    bm.top.release_blocks(store(bm, hs, [toks[:4], toks[4:]]))
    got = bm.match_sequence_hashes(hs, tokens=toks)
    assert len(got) == 2
    bm.top.release_blocks(got)
    forged = [0, 1, 2, 3, 99, 5, 6, 7]  # as if hs[1] had been computed for other tokens (a crafted collision)
    got = bm.match_sequence_hashes(hs, tokens=forged)
    assert [b.sequence_hash for b in got] == hs[:1]
    bm.top.release_blocks(got)
    # Registering a known hash with other tokens is refused, nothing changes.
    blocks = bm.top.allocate_blocks(1)
    with pytest.raises(InvalidBlockError, match="collision"):
        bm.top.register_blocks(blocks, hs[1:2], [forged[4:]])
    with pytest.raises(ValueError, match="tokens"):
        bm.top.register_blocks(blocks, hs[1:2], [[1, 2]])
    bm.top.release_blocks(blocks)
    # Tokens travel with the block to the host tier and back.
    bm.trigger_eviction("aggressive")
    got = bm.match_sequence_hashes(hs, tokens=forged)
    assert len(got) == 1
    bm.top.release_blocks(got)
    got = bm.match_sequence_hashes(hs, tokens=toks)
    assert len(got) == 2
    bm.top.release_blocks(got)


def test_compute_cache_keys_matches_manager(two_tier: KvBlockManager) -> None:
    keys = compute_cache_keys(["a", "b"], [list(range(9)), list(range(100, 104))], SMALL.page_size)
    assert keys["a"] == two_tier.sequence_hashes(list(range(9)))
    assert len(keys["b"]) == 1


def test_custom_policy_is_used_and_misbehaviour_is_caught() -> None:
    calls: list[str] = []

    class CountingLRU(LRUPolicy):
        def evict(self):  # type: ignore[no-untyped-def]
            calls.append("evict")
            return super().evict()

    register_eviction_policy("counting-lru", CountingLRU)
    cfg = KvBlockManagerConfig(model=SMALL, device=LayoutConfig(num_blocks=2), eviction="counting-lru",
                               device_type="cpu")
    with KvBlockManager(cfg) as bm:
        hs = bm.sequence_hashes(list(range(4 * 3)))
        bm.top.release_blocks(store(bm, hs[:2]))
        bm.top.release_blocks(store(bm, hs[2:3]))
        assert calls == ["evict"]

    class Rogue(LRUPolicy):
        def evict(self):  # type: ignore[no-untyped-def]
            return next(iter(self._held), None)  # a held block: must never be evicted

    register_eviction_policy("rogue", Rogue)
    cfg = KvBlockManagerConfig(model=SMALL, device=LayoutConfig(num_blocks=2), eviction="rogue", device_type="cpu")
    with KvBlockManager(cfg) as bm:
        hs = bm.sequence_hashes(list(range(4 * 3)))
        held = store(bm, hs[:1])
        bm.top.release_blocks(store(bm, hs[1:2]))
        with pytest.raises(InvalidBlockError, match="not an evictable block"):
            bm.top.allocate_blocks(1)
        assert all(torch.equal(block_data(b), content_for(b.sequence_hash)) for b in held)
        bm.top.release_blocks(held)
