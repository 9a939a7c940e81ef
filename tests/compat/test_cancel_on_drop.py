"""Seed 004's CancelOnLastDrop: a KvBlockManager dropped without close() is collected and stops its threads."""

from __future__ import annotations

import gc
import threading
import warnings
import weakref
from pathlib import Path

import pytest
from kvdata import SMALL

from tiered_kv import (
    DiskConfig,
    KvBlockManager,
    KvBlockManagerConfig,
    LayoutConfig,
    ShutdownError,
    create_kv_cache_manager,
)
from tiered_kv.compat import PrefixCacheManager
from tiered_kv.manager import UnclosedManagerWarning


def three_tiers(path: Path) -> KvBlockManagerConfig:
    return KvBlockManagerConfig(model=SMALL, device=LayoutConfig(num_blocks=4), host=LayoutConfig(num_blocks=8),
                                disk=DiskConfig(path=path, num_blocks=16), device_type="cpu")


def started_by(fn: object) -> tuple[object, list[threading.Thread]]:
    before = set(threading.enumerate())
    obj = fn()  # type: ignore[operator]
    return obj, [t for t in threading.enumerate() if t not in before]


def test_dropped_manager_is_collected_and_its_threads_stop(tmp_path: Path) -> None:
    bm, threads = started_by(lambda: KvBlockManager(three_tiers(tmp_path)))
    assert isinstance(bm, KvBlockManager)
    bm.on_memory_pressure(lambda tier, usage: None)  # starts the event thread too
    threads += [t for t in threading.enumerate() if t.name == "tiered-kv-events" and t not in threads]
    assert len(threads) >= 5
    device = bm.device()
    assert device is not None
    block = device.allocate_blocks(1)[0]  # a handle may outlive its manager
    ref = weakref.ref(bm)
    with pytest.warns(UnclosedManagerWarning, match="without close"):
        del bm
        gc.collect()
    assert ref() is None
    for t in threads:
        t.join(10.0)
    assert [t.name for t in threads if t.is_alive()] == []
    with pytest.raises(ShutdownError):
        device.allocate_blocks(1)
    block.release()  # still fine
    with KvBlockManager(three_tiers(tmp_path)) as again:  # the disk tier's writer lock was released
        assert again.disk() is not None


def test_a_closed_manager_warns_nothing_when_dropped(tmp_path: Path) -> None:
    bm = KvBlockManager(three_tiers(tmp_path))
    bm.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        del bm
        gc.collect()


def test_dropping_a_facade_drops_its_manager() -> None:
    cache, threads = started_by(lambda: PrefixCacheManager(4, 4, host_blocks=8, device_type="cpu"))
    with pytest.warns(UnclosedManagerWarning):
        del cache
        gc.collect()
    for t in threads:
        t.join(10.0)
    assert not any(t.is_alive() for t in threads)
    mgr = create_kv_cache_manager(1, 1, 4, 4, 4, num_cpu_blocks=4)
    ref = weakref.ref(mgr)
    with pytest.warns(UnclosedManagerWarning):
        del mgr
        gc.collect()
    assert ref() is None
