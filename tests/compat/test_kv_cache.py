"""Seed 003 (KVCacheManager) facade: per-request paged allocation and CPU swap on the tiered engine."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

import tiered_kv
from tiered_kv import ConfigError, KvBlockManager, KvBlockManagerConfig, LayoutConfig, ModelConfig
from tiered_kv.compat import DeviceType, DType, KVCacheBlocks, KVCacheConfig, KVCacheManager, KVCacheTransfer


@pytest.fixture
def mgr() -> Iterator[KVCacheManager]:
    cfg = KVCacheConfig(num_layers=2, num_heads=2, head_dim=4, block_size=4, num_gpu_blocks=8, num_cpu_blocks=8,
                        dtype=DType.FLOAT32, device=DeviceType.CPU)
    with KVCacheManager(cfg) as m:
        yield m


def test_config_sizes_and_enums() -> None:
    cfg = KVCacheConfig(num_layers=32, num_heads=8, head_dim=128, block_size=16, num_gpu_blocks=10)
    assert cfg.kv_size_per_token() == 2 * 32 * 8 * 128 * 2  # K and V, float16
    assert cfg.block_size_bytes() == 16 * cfg.kv_size_per_token()
    assert cfg.device == "cuda" and type(cfg.device) is str and cfg.dtype == "float16"
    bf = KVCacheConfig(num_layers=2, num_heads=1, head_dim=4, block_size=4, num_gpu_blocks=1, dtype="bfloat16")
    assert bf.model_config() == ModelConfig(num_layers=2, inner_dim=4, page_size=4, dtype=DType.BFLOAT16)
    with pytest.raises(ConfigError, match="head_dim"):
        KVCacheConfig(num_layers=2, num_heads=1, head_dim=0, block_size=4, num_gpu_blocks=1)
    with pytest.raises(ConfigError, match="dtype"):
        KVCacheConfig(num_layers=2, num_heads=1, head_dim=4, block_size=4, num_gpu_blocks=1, dtype="float64")
    with pytest.raises(ConfigError, match="colour"):
        KVCacheConfig(num_layers=2, num_heads=1, head_dim=4, block_size=4, num_gpu_blocks=1,
                      manager_options={"colour": "red"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CUDA default on a machine without CUDA")
def test_seed_default_device_is_cuda_and_says_so_without_it() -> None:
    cfg = KVCacheConfig(num_layers=2, num_heads=1, head_dim=4, block_size=4, num_gpu_blocks=1)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        KVCacheManager(cfg)


def test_request_lifecycle(mgr: KVCacheManager) -> None:
    blocks = mgr.allocate("r1", 10)
    assert isinstance(blocks, KVCacheBlocks) and blocks.num_blocks() == 3 and blocks.cpu_blocks == []
    assert mgr.extend("r1", 1) == []  # 11 tokens still fit in 3 blocks
    new = mgr.extend("r1", 5)
    assert len(new) == 1
    table = mgr.get_block_table("r1", layer_idx=0)
    assert table == blocks.gpu_blocks + new == mgr.get_block_table("r1", layer_idx=1)
    with pytest.raises(IndexError, match="layer_idx"):
        mgr.get_block_table("r1", layer_idx=2)
    assert mgr.usage() == pytest.approx(4 / 8) and mgr.get_num_free_blocks() == 4
    assert mgr.can_allocate(16) and not mgr.can_allocate(17)
    with pytest.raises(ValueError, match="already allocated"):
        mgr.allocate("r1", 1)
    mgr.free("r1")
    assert mgr.get_num_free_blocks() == 8
    with pytest.raises(KeyError):
        mgr.free("r1")


def test_memory_pressure_callback(mgr: KVCacheManager) -> None:
    fired = threading.Event()
    seen: list[tuple[str, float]] = []

    def on_pressure(tier: str, usage: float) -> None:
        seen.append((tier, usage))
        fired.set()

    mgr.on_memory_pressure(on_pressure, threshold=0.75)
    mgr.allocate("big", 4 * 6)
    assert fired.wait(10.0)
    assert seen[0] == ("device", 0.75)


def test_swap_out_and_in_keep_the_bytes(mgr: KVCacheManager) -> None:
    device = mgr.device()
    assert device is not None
    hashes = mgr.sequence_hashes(list(range(8)))
    blocks = device.allocate_blocks(2)
    for i, b in enumerate(blocks):
        b.write(1, 0, torch.full((4, 8), float(i + 1)))
    gpu = device.register_blocks(blocks, hashes)
    transfer = KVCacheTransfer(mgr)
    cpu = transfer.swap_out(gpu)
    assert cpu is not None and [b.tier for b in cpu] == ["host", "host"]
    device.release_blocks(gpu)
    mgr.trigger_eviction("aggressive")
    back = transfer.swap_in(cpu)
    assert back is not None and [float(b.layer_view(1, 0)[0, 0]) for b in back] == [1.0, 2.0]
    host = mgr.host()
    assert host is not None
    dst = host.allocate_blocks(1)
    transfer.swap_out(back[0], dst[0])  # a plain copy into a given host block
    assert float(dst[0].layer_view(1, 0)[0, 0]) == 1.0
    host.release_blocks(dst + cpu)
    device.release_blocks(back)


def test_create_kv_cache_manager_is_a_kv_block_manager() -> None:
    with tiered_kv.create_kv_cache_manager(2, 2, 4, 16, 4, num_cpu_blocks=8, dtype="float32",
                                           worker_id="w7", eviction="lru") as m:
        assert isinstance(m, KvBlockManager) and isinstance(m, KVCacheManager)
        assert m.worker_id == "w7" and m.config.eviction == "lru"
        assert m.model.kv_size_per_token == 2 * 2 * 2 * 4 * 4
        assert m.device().total_blocks() == 16 and m.host().total_blocks() == 8  # type: ignore[union-attr]
        assert m.allocate("r", 5).gpu_blocks == m.get_block_table("r")
    with pytest.raises(ConfigError, match="num_cpu_blocks"):
        tiered_kv.create_kv_cache_manager(2, 2, 4, 16, 4, host=LayoutConfig(num_blocks=2))


def test_kv_cache_manager_takes_an_engine_config() -> None:
    cfg = KvBlockManagerConfig(model=ModelConfig(num_layers=1, inner_dim=4, page_size=2),
                               device=LayoutConfig(num_blocks=2), device_type=DeviceType.CPU)
    with KVCacheManager(cfg) as m:
        assert m.kv_config is None and m.allocate("x", 4).num_blocks() == 2


def test_seed_fields_may_be_positional() -> None:
    cfg = KVCacheConfig(2, 1, 4, 4, 8, 2, DType.FLOAT32, DeviceType.CPU)
    assert (cfg.num_gpu_blocks, cfg.num_cpu_blocks, cfg.dtype, cfg.device) == (8, 2, "float32", "cpu")
    with pytest.raises(TypeError):
        KVCacheConfig(2, 1, 4, 4, 8, 2, "float32", "cpu", {})  # type: ignore[misc]  # engine options by keyword
