"""Seed 001: trigger_eviction(EvictionMode) on pools, the manager and facades; should_evict predicate policies."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from kvdata import SMALL, fill, hashes

from tiered_kv import ConfigError, KvBlockManager, KvBlockManagerConfig, LayoutConfig
from tiered_kv.compat import BlockMetadata, EvictionMode, PredicatePolicy, predicate_policy, register_eviction_policy
from tiered_kv.pool import BlockPool


def cache_blocks(pool: BlockPool, keys: list[bytes]) -> None:
    blocks = pool.allocate_blocks(len(keys))
    for b, k in zip(blocks, keys):
        fill(b, k)
    pool.release_blocks(pool.register_blocks(blocks, keys))


@pytest.fixture
def bm() -> Iterator[KvBlockManager]:
    cfg = KvBlockManagerConfig(model=SMALL, device=LayoutConfig(num_blocks=8), host=LayoutConfig(num_blocks=16),
                               device_type="cpu")
    with KvBlockManager(cfg) as m:
        yield m


def test_eviction_mode_is_a_str_enum() -> None:
    assert EvictionMode.NORMAL == "normal" and EvictionMode("aggressive") is EvictionMode.AGGRESSIVE
    assert str(EvictionMode.AGGRESSIVE) == "aggressive"


@pytest.mark.parametrize("mode", [EvictionMode.NORMAL, "normal"])
def test_normal_frees_a_quarter_of_the_tier(bm: KvBlockManager, mode: str) -> None:
    device = bm.device()
    assert device is not None
    cache_blocks(device, hashes(8))
    assert device.trigger_eviction(mode) == 2  # 8 // 4 free slots wanted, none free
    assert device.stats()["free_blocks"] == 2
    assert device.trigger_eviction(mode) == 0  # already a quarter free
    bm.flush()
    host = bm.host()
    assert host is not None
    evicted = [h for h in hashes(8) if h not in device]
    # The victims were demoted (the cleaner may have copied others down ahead of need as well).
    assert len(evicted) == 2 and all(h in host for h in evicted)


@pytest.mark.parametrize("mode", [EvictionMode.AGGRESSIVE, "aggressive"])
def test_aggressive_evicts_every_inactive_block(bm: KvBlockManager, mode: str) -> None:
    device = bm.device()
    assert device is not None
    cache_blocks(device, hashes(6))
    held = device.match_sequence_hashes(hashes(6)[:1])
    assert bm.trigger_eviction(mode) == 5  # the held one stays
    bm.flush()
    assert bm.trigger_eviction(EvictionMode.AGGRESSIVE, tier="host") == 5  # the demoted copies, all inactive
    device.release_blocks(held)
    with pytest.raises(ValueError, match="EvictionMode"):
        bm.trigger_eviction("gentle")


def test_should_evict_object_picks_victims_before_lru_order() -> None:
    class Priority:
        """Seed 001's policy trait: evict what is marked disposable (priority < 0) first."""

        def should_evict(self, block: BlockMetadata) -> bool:
            return block.priority < 0

    register_eviction_policy("test-priority", Priority())
    cfg = KvBlockManagerConfig(model=SMALL, device=LayoutConfig(num_blocks=4), eviction="test-priority",
                               device_type="cpu")
    with KvBlockManager(cfg) as bm:
        device = bm.device()
        assert device is not None and isinstance(device.policy, PredicatePolicy)
        keys = hashes(4)
        cache_blocks(device, keys)
        device.policy.set_priority(keys[2], -1)
        meta = device.policy.metadata(keys[2])
        assert meta is not None and meta.priority == -1 and meta.access_count == 1
        assert meta.last_access_time <= time.monotonic()
        first = device.allocate_blocks(1)  # needs one slot: the disposable block goes, not LRU keys[0]
        assert keys[2] not in device and keys[0] in device
        second = device.allocate_blocks(1)  # nothing approved now: plain LRU order
        assert keys[0] not in device and keys[1] in device
        device.release_blocks(first + second)


def test_predicate_sees_recency_and_counts() -> None:
    seen: list[BlockMetadata] = []

    def idle(block: BlockMetadata) -> bool:
        seen.append(block)
        return block.access_count == 1  # never hit since it was stored

    register_eviction_policy("test-idle", predicate_policy(idle))
    cfg = KvBlockManagerConfig(model=SMALL, device=LayoutConfig(num_blocks=3), eviction="test-idle", device_type="cpu")
    with KvBlockManager(cfg) as bm:
        device = bm.device()
        assert device is not None
        keys = hashes(3)
        cache_blocks(device, keys)
        device.release_blocks(device.match_sequence_hashes(keys[:1]))  # keys[0] hit once: count 2, most recent
        device.touch(keys[1:2])  # keys[1] too
        device.release_blocks(device.allocate_blocks(1))
        assert keys[2] not in device and keys[0] in device and keys[1] in device
        assert seen and all(isinstance(m, BlockMetadata) for m in seen)


def test_bad_policies_are_refused() -> None:
    with pytest.raises(ConfigError, match="should_evict"):
        register_eviction_policy("test-bad", object())
    with pytest.raises(ValueError, match="should_evict"):
        predicate_policy("old")  # type: ignore[arg-type]
