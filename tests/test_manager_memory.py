"""KvBlockManager over the device and host tiers: cross-tier match, promotion, demotion, truncation, shutdown."""

from __future__ import annotations

import asyncio

import pytest
import torch
from kvdata import SMALL, block_data, content_for, fill, store

from tiered_kv import (
    KvBlockManager,
    KvBlockManagerConfig,
    LayoutConfig,
    ShutdownError,
    compute_sequence_hashes,
)


def test_sequence_hashes_use_manager_settings(two_tier: KvBlockManager) -> None:
    toks = list(range(19))
    assert two_tier.sequence_hashes(toks) == compute_sequence_hashes(toks, SMALL.page_size)
    assert len(two_tier.sequence_hashes(toks)) == 4


def test_demotion_and_promotion_keep_bytes(two_tier: KvBlockManager) -> None:
    bm = two_tier
    hs = bm.sequence_hashes(list(range(40)))  # 10 blocks through a 4-block device tier
    store(bm, hs)
    off = bm.metrics()["offload"]
    # 6 victims were copied down; the cleaner may have copied more ahead of need (inclusive tiers).
    assert off["demotions"] >= 6 and off["bytes_demoted"] == off["demotions"] * SMALL.block_size_bytes
    got = bm.match_sequence_hashes(hs)
    # The device tier holds 4 blocks: the longest prefix it can hold, its own later blocks evicted to make room.
    assert [b.sequence_hash for b in got] == hs[:4]
    assert all(b.tier == "device" for b in got)
    for b in got:
        assert torch.equal(block_data(b), content_for(b.sequence_hash))
    bm.top.release_blocks(got)
    m = bm.metrics()
    assert m["offload"]["promotions"] == 4
    assert m["host"]["hits"] >= 4 and m["device"]["misses"] >= 1
    assert set(m) == {"device", "host", "offload"}
    for tier in ("device", "host"):
        assert {"total_blocks", "available_blocks", "hits", "misses", "hit_rate", "evictions"} <= set(m[tier])


def test_match_interleaved_tiers_per_hash(two_tier: KvBlockManager) -> None:
    bm = two_tier
    hs = bm.sequence_hashes(list(range(12)))  # 3 blocks
    host = bm.host()
    assert host is not None
    # hs[1] only in host; hs[0], hs[2] only in device.
    for pool, part in ((bm.top, [hs[0], hs[2]]), (host, [hs[1]])):
        blocks = pool.allocate_blocks(len(part))
        for b, h in zip(blocks, part):
            fill(b, h)
        pool.release_blocks(pool.register_blocks(blocks, part))
    got = bm.match_sequence_hashes(hs)
    assert [b.sequence_hash for b in got] == hs
    assert [b.tier for b in got] == ["device"] * 3
    for b in got:
        assert torch.equal(block_data(b), content_for(b.sequence_hash))
    bm.top.release_blocks(got)
    assert hs[1] in host  # inclusive: the lower copy stays


def test_truncation_when_top_tier_is_held(two_tier: KvBlockManager) -> None:
    bm = two_tier
    hs = bm.sequence_hashes(list(range(24)))  # 6 blocks
    store(bm, hs)
    other = bm.top.allocate_blocks(3)  # someone else holds 3 of the 4 device blocks
    got = bm.match_sequence_hashes(hs)
    assert [b.sequence_hash for b in got] == hs[:1]
    bm.top.release_blocks(got + other)


def test_held_blocks_of_others_are_not_evicted(two_tier: KvBlockManager) -> None:
    bm = two_tier
    hs = bm.sequence_hashes(list(range(32)))
    store(bm, hs)
    mine = bm.match_sequence_hashes(hs[4:6])  # device now holds hs[4], hs[5] for me
    got = bm.match_sequence_hashes(hs[:4])
    assert len(got) == 2  # only two device slots were free or evictable
    assert all(h in bm.top for h in (hs[4], hs[5]))
    bm.top.release_blocks(got + mine)


def test_miss_stops_and_counts(two_tier: KvBlockManager) -> None:
    bm = two_tier
    hs = bm.sequence_hashes(list(range(16)))
    assert bm.match_sequence_hashes(hs) == []
    m = bm.metrics()
    assert m["device"]["misses"] == 1 and m["host"]["misses"] == 1


def test_async_match(two_tier: KvBlockManager) -> None:
    bm = two_tier
    hs = bm.sequence_hashes(list(range(16)))
    store(bm, hs)
    got = asyncio.run(bm.match_sequence_hashes_async(hs))
    assert len(got) == 4
    bm.top.release_blocks(got)


def test_host_only_and_device_only_managers() -> None:
    for kwargs in ({"host": LayoutConfig(num_blocks=4)}, {"device": LayoutConfig(num_blocks=4)}):
        with KvBlockManager(KvBlockManagerConfig(model=SMALL, device_type="cpu", **kwargs)) as bm:
            hs = bm.sequence_hashes(list(range(8)))
            store(bm, hs)
            got = bm.match_sequence_hashes(hs)
            assert len(got) == 2 and got[0].tier == next(iter(kwargs))
            bm.top.release_blocks(got)
            assert set(bm.metrics()) == {next(iter(kwargs)), "offload"}


def test_close_semantics() -> None:
    bm = KvBlockManager(KvBlockManagerConfig(model=SMALL, device=LayoutConfig(num_blocks=4), device_type="cpu"))
    hs = bm.sequence_hashes(list(range(8)))
    store(bm, hs)
    held = bm.match_sequence_hashes(hs)
    bm.close()
    bm.close()
    for call in (
        lambda: bm.match_sequence_hashes(hs),
        lambda: bm.top.allocate_blocks(1),
        lambda: bm.top.match_sequence_hashes(hs),
        lambda: bm.flush(),
    ):
        with pytest.raises(ShutdownError):
            call()
    assert bm.device() is not None and bm.host() is None and bm.disk() is None
    assert "device" in bm.metrics()
    for b in held:
        b.release()  # still allowed
