"""The cyclic GC pause around bulk matches (tiered_kv._gc): nesting, threads, its bound, and a long match's use."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from kvdata import SMALL, block_data, content_for

from tiered_kv import DiskConfig, KvBlockManager, KvBlockManagerConfig, LayoutConfig, _gc
from tiered_kv._gc import gc_paused
from tiered_kv.manager import GC_PAUSE_MIN_BLOCKS


@pytest.fixture(autouse=True)
def _collector_enabled() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def test_nested_pauses_end_with_the_outermost() -> None:
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_pause_never_enables_a_disabled_collector() -> None:
    gc.disable()
    with gc_paused():
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_overlapping_pauses_of_two_threads_end_with_the_last() -> None:
    inside, release = threading.Event(), threading.Event()

    def other() -> None:
        with gc_paused():
            inside.set()
            release.wait(10)

    t = threading.Thread(target=other)
    with gc_paused():
        t.start()
        assert inside.wait(10)
    assert not gc.isenabled()  # the other thread's pause is still in progress
    release.set()
    t.join(10)
    assert gc.isenabled()


def test_overlapping_pauses_stop_pausing_past_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_gc, "MAX_PAUSE_S", -1.0)  # every pause has overlapped too long
    with gc_paused():
        with gc_paused():
            assert not gc.isenabled()
        assert gc.isenabled()  # the inner end re-enabled it early
        with gc_paused():  # and no new pause starts until the current ones end
            assert gc.isenabled()
    assert gc.isenabled()
    with gc_paused():  # after they all ended, pausing works again
        assert not gc.isenabled()


def test_a_long_match_promotes_from_disk_with_the_collector_paused(tmp_path: Path) -> None:
    n = 2 * GC_PAUSE_MIN_BLOCKS
    cfg = KvBlockManagerConfig(
        model=SMALL,
        host=LayoutConfig(num_blocks=n),
        disk=DiskConfig(path=str(tmp_path), num_blocks=n, backend="posix", writeback_s=None),
        device_type="cpu",
    )
    with KvBlockManager(cfg) as bm:
        hs = bm.sequence_hashes(list(range(n * SMALL.page_size)))
        disk = bm.disk()
        assert disk is not None
        blocks = disk.allocate_blocks(n)
        disk.scatter(blocks, torch.stack([content_for(h) for h in hs]))
        disk.release_blocks(disk.register_blocks(blocks, hs))
        bm.flush()
        host = bm.host()
        assert host is not None
        host.reset()
        collections: list[int] = []

        def seen(phase: str, info: dict) -> None:
            if phase == "start":
                collections.append(info["generation"])

        gc.callbacks.append(seen)
        try:
            short = bm.match_sequence_hashes(hs[: n // 4])  # below the threshold: the collector may run
            bm.top.release_blocks(short)
            gc.collect()  # the young generation starts empty: only what the match allocates could trigger a pass
            collections.clear()
            got = bm.match_sequence_hashes(hs)
        finally:
            gc.callbacks.remove(seen)
        # Thousands of short-lived objects, and no pass while the match ran: at most the one young-generation pass
        # of what outlived the pause, as the collector comes back on at its end.
        assert collections in ([], [0]), collections
        assert gc.isenabled()
        assert [b.sequence_hash for b in got] == hs and all(b.tier == "host" for b in got)
        for b in got:
            assert torch.equal(block_data(b), content_for(b.sequence_hash))
        bm.top.release_blocks(got)
