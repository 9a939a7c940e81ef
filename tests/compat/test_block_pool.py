"""Seed 000 (BlockPoolManager) facade: vLLM's BlockPool calls by integer id, running on the tiered engine."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tiered_kv import InvalidBlockError, KvBlockManager, NotEnoughBlocksAvailable
from tiered_kv.compat import (
    ARCPolicy,
    BlockPool,
    BlockPoolConfig,
    BlockState,
    EvictionEvent,
    EvictionMode,
    KVCacheMetricsCollector,
    compute_block_hash,
)
from tiered_kv.errors import ConfigError


def key(i: int) -> bytes:
    return compute_block_hash(f"block-{i}".encode())


@pytest.fixture
def pool() -> Iterator[BlockPool]:
    with BlockPool(BlockPoolConfig(num_blocks=4, block_size=4, num_layers=2, inner_dim=8, dtype="float32",
                                   host_blocks=16, device_type="cpu")) as p:
        yield p


def fill_and_cache(pool: BlockPool, keys: list[bytes]) -> list[int]:
    blocks = pool.get_new_blocks(len(keys))
    for b, k in zip(blocks, keys):
        b.layer_view(1, 1).fill_(float(k[0]))
    return [b.block_id for b in pool.cache_blocks([b.block_id for b in blocks], keys)]


def test_compute_block_hash_is_a_stable_pool_key() -> None:
    assert compute_block_hash(b"abc") == compute_block_hash(bytearray(b"abc")) != compute_block_hash(b"abd")
    assert len(compute_block_hash(b"abc")) == 32 and len(compute_block_hash(b"abc", "xxh3_128")) == 16
    with pytest.raises(ValueError, match="content"):
        compute_block_hash("abc")  # type: ignore[arg-type]


def test_config_is_validated_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="block_size"):
        BlockPoolConfig(num_blocks=4, block_size=0)
    with pytest.raises(ConfigError, match="eviction"):
        BlockPoolConfig(num_blocks=4, block_size=4, eviction="mru")
    with pytest.raises(ConfigError, match="disk_blocks"):
        BlockPoolConfig(num_blocks=4, block_size=4, disk_blocks=8)


def test_get_new_blocks_is_all_or_nothing(pool: BlockPool) -> None:
    blocks = pool.get_new_blocks(3)
    assert sorted(b.block_id for b in blocks) == [0, 1, 2]
    assert all(b.state is BlockState.ALLOCATED and b.block_hash is None for b in blocks)
    with pytest.raises(NotEnoughBlocksAvailable) as err:
        pool.get_new_blocks(2)
    assert (err.value.requested, err.value.available) == (2, 1)
    assert pool.get_num_free_blocks() == 1


def test_cached_block_is_found_without_a_reference_and_touch_takes_one(pool: BlockPool) -> None:
    ids = fill_and_cache(pool, [key(0), key(1)])
    pool.free_blocks(ids)
    assert [pool.get_block(i).state for i in ids] == [BlockState.CACHED, BlockState.CACHED]
    hit = pool.lookup_cached_block(key(0))
    assert hit is not None and hit.block_id == ids[0] and hit.block_hash == key(0)
    assert hit.ref_cnt == 0 and hit.state is BlockState.CACHED  # lookup took no reference
    assert pool.lookup_cached_block(key(9)) is None
    pool.touch([hit.block_id])
    assert hit.ref_cnt == 1 and hit.state is BlockState.ALLOCATED
    assert float(hit.layer_view(1, 1)[0, 0]) == float(key(0)[0])
    # The touched block is held: only the other 3 slots can be given out.
    with pytest.raises(NotEnoughBlocksAvailable):
        pool.get_new_blocks(4)
    pool.free_blocks([hit.block_id])
    assert len(pool.get_new_blocks(4)) == 4  # everything was evictable again


def test_free_blocks_of_an_id_not_held_changes_nothing(pool: BlockPool) -> None:
    ids = fill_and_cache(pool, [key(0)])
    with pytest.raises(InvalidBlockError, match=r"block_ids\[1\]"):
        pool.free_blocks([ids[0], 3])
    assert pool.get_block(ids[0]).ref_cnt == 1  # the valid id was not released either
    with pytest.raises(InvalidBlockError):
        pool.touch([3])  # not cached


def test_caching_a_known_hash_keeps_the_existing_block(pool: BlockPool) -> None:
    first = fill_and_cache(pool, [key(0)])
    again = fill_and_cache(pool, [key(0)])
    assert again == first
    assert pool.get_block(first[0]).ref_cnt == 2
    assert pool.get_stats()["free_blocks"] == 3  # the duplicate's slot was freed


def test_pinned_blocks_survive_pressure(pool: BlockPool) -> None:
    ids = fill_and_cache(pool, [key(0), key(1)])
    pool.free_blocks(ids)
    pool.pin_blocks([ids[0]])
    assert pool.get_block(ids[0]).state is BlockState.PINNED
    with pytest.raises(NotEnoughBlocksAvailable):
        pool.get_new_blocks(4)
    assert pool.trigger_eviction(EvictionMode.AGGRESSIVE) == 1  # only the unpinned one
    assert pool.lookup_cached_block(key(0)).block_id == ids[0]  # type: ignore[union-attr]
    pool.unpin_blocks([ids[0]])
    with pytest.raises(InvalidBlockError):
        pool.unpin_blocks([ids[0]])
    assert len(pool.get_new_blocks(4)) == 4


def test_evicted_blocks_come_back_from_the_host_tier_with_their_bytes(pool: BlockPool) -> None:
    first = [key(i) for i in range(4)]
    pool.free_blocks(fill_and_cache(pool, first))
    for round_ in range(1, 3):
        pool.free_blocks(fill_and_cache(pool, [key(10 * round_ + i) for i in range(4)]))
    stats = pool.get_stats()
    assert stats["evictions"] >= 8 and stats["tiers"]["host"]["cached_blocks"] >= 8
    hit = pool.lookup_cached_block(first[2])  # demoted to the host, promoted back
    assert hit is not None and hit.block_hash == first[2]
    pool.touch([hit.block_id])
    assert torch.equal(hit.layer_view(1, 1), torch.full((4, 8), float(first[2][0])))
    pool.free_blocks([hit.block_id])


def test_stats_and_metrics_collector(pool: BlockPool) -> None:
    pool.free_blocks(fill_and_cache(pool, [key(i) for i in range(4)]))
    pool.free_blocks(fill_and_cache(pool, [key(10 + i) for i in range(2)]))
    pool.lookup_cached_block(key(12))
    stats = pool.get_stats()
    assert stats["num_blocks"] == 4 and stats["block_size"] == 4 and stats["evictions"] == 2
    assert set(stats["policy"]) >= {"t1", "t2", "b1", "b2", "p"}
    assert stats["policy"]["t1"] + stats["policy"]["t2"] == 4  # every cached block is in T1 or T2
    assert stats["residency"]["count"] == 2 and stats["residency"]["max_s"] >= 0
    collector = KVCacheMetricsCollector(pool)
    recent = collector.get_recent_evictions(10)
    assert len(recent) == 2 and recent[0].timestamp <= recent[1].timestamp
    assert all(e.tier == "device" and e.reason == "capacity" for e in recent)
    collector.record_eviction(EvictionEvent("device", key(99), 3, "external", recent[-1].timestamp + 1))
    assert collector.get_recent_evictions(1)[0].reason == "external"
    assert collector.get_metrics()["evictions"] == 3
    assert collector.get_eviction_rate(60) == pytest.approx(3 / 60)
    with pytest.raises(ValueError):
        collector.record_eviction("evicted")  # type: ignore[arg-type]


def test_arc_policy_with_initial_target_and_stats() -> None:
    arc = ARCPolicy(4, p_initial=2.0)
    assert arc.get_stats() == {"t1": 0, "t2": 0, "b1": 0, "b2": 0, "p": 2.0, "capacity": 4}
    for k in "abacde":  # a moves to T2; e pushes b (LRU of T1, |T1| = 3 > p) into B1
        arc.request(k)
    assert arc.lists()["B1"] == ["b"]
    arc.request("b")  # a ghost hit in B1 raises p by max(|B2|/|B1|, 1) = 1
    stats = arc.get_stats()
    # REPLACE: |T1| = 3 is not > p = 3, so a (LRU of T2) goes to B2 and b enters T2
    assert stats == {"t1": 3, "t2": 1, "b1": 0, "b2": 1, "p": 3.0, "capacity": 4}
    arc.clear()
    assert arc.get_stats()["p"] == 2.0
    with pytest.raises(ValueError, match="p_initial"):
        ARCPolicy(4, p_initial=5)


def test_facade_on_an_existing_manager_leaves_it_open(two_tier: KvBlockManager) -> None:
    with BlockPool(manager=two_tier) as pool:
        ids = [b.block_id for b in pool.get_new_blocks(2)]
    assert not two_tier.closed
    assert two_tier.device().available_blocks() == 4  # type: ignore[union-attr]  # closing released them
    assert len(ids) == 2


def test_config_seed_fields_may_be_positional() -> None:
    cfg = BlockPoolConfig(8, 16, "lru")
    assert (cfg.num_blocks, cfg.block_size, cfg.eviction) == (8, 16, "lru")
    with BlockPool(BlockPoolConfig(2, 4, device_type="cpu")) as pool:
        assert len(pool.get_new_blocks(2)) == 2
