"""The cyclic GC pause around bulk matches (tiered_kv._gc): nesting, threads, its bound, and a long match's use."""

from __future__ import annotations

import gc
import os
import threading
import warnings
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


class _Holder:
    """Another thread inside a pause until released."""

    def __init__(self) -> None:
        self.inside, self.release = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        with gc_paused():
            self.inside.set()
            self.release.wait(30)

    def __enter__(self) -> _Holder:
        self.thread.start()
        assert self.inside.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.thread.join(30)


def test_overlapping_pauses_of_two_threads_end_with_the_last(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_gc, "MAX_PAUSE_S", 1e9)
    holder = _Holder()
    with gc_paused():
        holder.__enter__()
    try:
        assert not gc.isenabled()  # the other thread's pause is still in progress
    finally:
        holder.__exit__()
    assert gc.isenabled()


def test_one_threads_nested_pauses_are_never_cut_short(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_gc, "MAX_PAUSE_S", -1.0)  # every run of pauses is "too long"
    with gc_paused():
        with gc_paused():
            pass
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
    assert gc.isenabled()


def test_overlapping_pauses_of_several_threads_stop_past_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_gc, "MAX_PAUSE_S", -1.0)  # every run of pauses is "too long"
    with _Holder():
        assert not gc.isenabled()
        with gc_paused():  # a second thread joins a run past the bound: the collector comes back at once
            assert gc.isenabled()
            with gc_paused():  # and no pause starts again until the run is over
                assert gc.isenabled()
        assert gc.isenabled()
    assert gc.isenabled()
    with gc_paused():  # the run is over: pausing works again
        assert not gc.isenabled()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_during_another_threads_pause_gets_its_collector_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_gc, "MAX_PAUSE_S", 1e9)
    with _Holder():
        assert not gc.isenabled()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads running: the child only checks
            pid = os.fork()
        if pid == 0:  # the child: the holder thread does not exist here, its pause must not outlive the fork
            ok = gc.isenabled()
            with gc_paused():
                ok = ok and not gc.isenabled()
            os._exit(0 if ok and gc.isenabled() else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    assert gc.isenabled()


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
