"""Engine gaps the seed audit found (issue 16): worker_id, residency and ARC statistics in metrics, BlockState
order, eviction rates past 1,024 events, and str enums accepted wherever their strings are."""

from __future__ import annotations

import time

import msgpack
import pytest
from kvdata import SMALL, fill, hashes

from tiered_kv import (
    BlockState,
    ConfigError,
    DeviceType,
    DType,
    EvictionMode,
    HashAlgorithm,
    KvBlockManager,
    KvBlockManagerConfig,
    LayoutConfig,
    ModelConfig,
    compute_cache_keys,
    compute_sequence_hashes,
)
from tiered_kv.hashing import hash_length
from tiered_kv.metrics import PoolMetrics


def config(**kw: object) -> KvBlockManagerConfig:
    return KvBlockManagerConfig(model=SMALL, device=LayoutConfig(num_blocks=4), host=LayoutConfig(num_blocks=8),
                                device_type="cpu", **kw)  # type: ignore[arg-type]


def store(bm: KvBlockManager, keys: list[bytes]) -> None:
    device = bm.device()
    assert device is not None
    blocks = device.allocate_blocks(len(keys))
    for b, k in zip(blocks, keys):
        fill(b, k)
    device.release_blocks(device.register_blocks(blocks, keys))


def test_worker_id_is_configurable() -> None:
    with KvBlockManager(config(worker_id="prefill-0")) as bm:
        assert bm.worker_id == "prefill-0"
        assert msgpack.unpackb(bm.export_local_blockset())["worker_id"] == "prefill-0"
    with KvBlockManager(config(worker_id=0)) as bm:
        assert bm.worker_id == "0"
    with KvBlockManager(config()) as a, KvBlockManager(config()) as b:
        assert a.worker_id != b.worker_id and a.worker_id.count(":") == 2  # host:pid:id
    for bad in ("", -1, 1.5, True):
        with pytest.raises(ConfigError, match="worker_id"):
            config(worker_id=bad)


def test_residency_per_tier_in_metrics() -> None:
    with KvBlockManager(config()) as bm:
        keys = hashes(8)
        t0 = time.monotonic()
        store(bm, keys[:4])
        store(bm, keys[4:])  # evicts the first four from the device
        elapsed = time.monotonic() - t0
        bm.flush()
        m = bm.metrics()
        res = m["device"]["residency"]
        assert res["count"] == 4 and 0 < res["mean_s"] <= res["max_s"] <= elapsed
        assert res["p50_s"] <= res["p99_s"] <= res["max_s"]
        assert m["host"]["residency"]["count"] == 0  # nothing left the host yet
        events = bm.device().metrics.recent_evictions(10)  # type: ignore[union-attr]
        assert len(events) == 4 and all(0 < e.residency_s <= elapsed for e in events)


def test_arc_statistics_in_metrics() -> None:
    with KvBlockManager(config()) as bm:
        keys = hashes(3)
        store(bm, keys)
        bm.device().release_blocks(bm.match_sequence_hashes(keys[:1]))  # type: ignore[union-attr]  # keys[0]: T2
        arc = bm.metrics()["device"]["policy"]
        assert arc == {"t1": 2, "t2": 1, "b1": 0, "b2": 0, "p": 0.0, "capacity": 4}
    with KvBlockManager(config(eviction="lru")) as bm:
        assert "policy" not in bm.metrics()["device"]  # LRU has no lists to report


def test_block_state_order_follows_seed_000() -> None:
    assert BlockState.PINNED > BlockState.CACHED > BlockState.ALLOCATED > BlockState.FREE
    assert sorted(BlockState) == [BlockState.FREE, BlockState.ALLOCATED, BlockState.CACHED, BlockState.PINNED]


def test_eviction_rate_counts_more_than_the_kept_events() -> None:
    m = PoolMetrics("device")
    for i in range(50):
        m.record_evictions([(bytes([i % 256]) * 32, j) for j in range(100)], "capacity")
    assert m.evictions == 5000
    assert m.eviction_rate(60.0) == pytest.approx(5000 / 60.0)  # not 1024 / 60
    assert len(m.recent_evictions(10_000)) == 1024  # the kept list is only for inspection
    with pytest.raises(ValueError, match="window_seconds"):
        m.eviction_rate(0)


def test_eviction_rate_window_excludes_old_seconds() -> None:
    m = PoolMetrics("host")
    now = int(time.monotonic())
    m._count(700, now - 120.0)  # two minutes ago
    m._count(60, float(now))
    assert m.evictions == 760
    assert m.eviction_rate(60.0) == pytest.approx(60 / 60.0)
    assert m.eviction_rate(600.0) == pytest.approx(760 / 600.0)


def test_str_enums_are_accepted_where_strings_are() -> None:
    model = ModelConfig(num_layers=1, inner_dim=4, dtype=DType.BFLOAT16)
    assert model.dtype == "bfloat16" and type(model.dtype) is str
    assert model.fingerprint() == ModelConfig(num_layers=1, inner_dim=4, dtype="bfloat16").fingerprint()
    cfg = KvBlockManagerConfig(model=model, host=LayoutConfig(num_blocks=2), hash_algorithm=HashAlgorithm.XXH3_128,
                               device_type=DeviceType.CPU)
    assert (type(cfg.hash_algorithm), type(cfg.device_type)) == (str, str)
    assert cfg.hash_algorithm == "xxh3_128" and cfg.device_type == "cpu"
    assert hash_length(HashAlgorithm.XXH3_128) == 16
    tokens = list(range(32))
    assert compute_sequence_hashes(tokens, 16, algorithm=HashAlgorithm.XXH3_128) == compute_sequence_hashes(
        tokens, 16, algorithm="xxh3_128")
    assert compute_cache_keys(["r"], [tokens], 16, algorithm=HashAlgorithm.SHA256)["r"] == compute_sequence_hashes(
        tokens, 16)
    with KvBlockManager(cfg) as bm:
        assert bm.trigger_eviction(EvictionMode.NORMAL, tier="host") == 0
        assert len(bm.export_local_blockset()) > 0  # msgpack takes the normalised strings


def test_residency_and_arc_reach_prometheus() -> None:
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry, generate_latest

    from tiered_kv.prometheus import register_collector

    with KvBlockManager(config()) as bm:
        store(bm, hashes(4))
        store(bm, hashes(6)[4:] + hashes(2, seed=9))  # 4 more: the first 4 are evicted from the device
        text = generate_latest(register_collector(bm, CollectorRegistry())).decode()
        assert 'tiered_kv_tier_residency_seconds{stat="max",tier="device"}' in text
        assert 'tiered_kv_tier_arc{list="t1",tier="device"} 4.0' in text
