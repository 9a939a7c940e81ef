"""Every match source passes one conformance suite, checked against a plain dict model of what it holds."""

from __future__ import annotations

import contextlib
from array import array
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from kvdata import SMALL

from tiered_kv import DiskConfig, KvBlockManager, KvBlockManagerConfig, LayoutConfig
from tiered_kv.sources import InflightSource, MatchSource, SnapshotBlock
from tiered_kv.storage.staging import StagingPool
from tiered_kv.testing import MatchSourceTests, SourceEntry


def _register(bm: KvBlockManager, tier: str, entries: list[SourceEntry]) -> None:
    pool = {"host": bm.host, "disk": bm.disk}[tier]()
    assert pool is not None
    blocks = pool.allocate_blocks(len(entries))
    pool.scatter(blocks, torch.stack([e.data for e in entries]))
    toks = [list(array("I", e.tokens or b"")) for e in entries]
    pool.release_blocks(
        pool.register_blocks(blocks, [e.sequence_hash for e in entries], toks, parents=[e.parent for e in entries])
    )


class TestHostPool(MatchSourceTests):
    @contextlib.contextmanager
    def open_source(self, entries: list[SourceEntry], tmp_path: Path) -> Iterator[MatchSource]:
        cfg = KvBlockManagerConfig(model=SMALL, host=LayoutConfig(num_blocks=32), device_type="cpu")
        with KvBlockManager(cfg) as bm:
            _register(bm, "host", entries)
            yield bm.host()  # type: ignore[misc]


class TestDiskPool(MatchSourceTests):
    @contextlib.contextmanager
    def open_source(self, entries: list[SourceEntry], tmp_path: Path) -> Iterator[MatchSource]:
        disk = DiskConfig(path=tmp_path / "kv", num_blocks=32, backend="posix", durability="none")
        with KvBlockManager(KvBlockManagerConfig(model=SMALL, disk=disk, device_type="cpu")) as bm:
            _register(bm, "disk", entries)
            yield bm.disk()  # type: ignore[misc]


class TestInflightQueue(MatchSourceTests):
    @contextlib.contextmanager
    def open_source(self, entries: list[SourceEntry], tmp_path: Path) -> Iterator[MatchSource]:
        queued = InflightSource("disk")
        queued.put(
            [e.sequence_hash for e in entries],
            [e.data.clone() for e in entries],
            [e.tokens for e in entries],
            [e.parent for e in entries],
        )
        yield queued


def test_the_suite_catches_a_source_that_ignores_higher_tiers(tmp_path: Path) -> None:
    class Greedy(InflightSource):
        def match_run(self, hashes, start, higher, expected=None):  # type: ignore[no-untyped-def]
            return super().match_run(hashes, start, (), expected)  # takes what a higher tier holds too

    class TestGreedy(TestInflightQueue):
        @contextlib.contextmanager
        def open_source(self, entries: list[SourceEntry], tmp_path: Path) -> Iterator[MatchSource]:
            queued = Greedy("disk")
            queued.put([e.sequence_hash for e in entries], [e.data for e in entries], [e.tokens for e in entries])
            yield queued

    with pytest.raises(AssertionError):
        TestGreedy().test_run_yields_to_higher_sources(tmp_path)


def test_queued_snapshot_buffers_are_reused_only_after_their_last_reader() -> None:
    """A written snapshot's buffer goes back to staging at once, unless a matched handle still reads it: then at
    that handle's release (a reused buffer under a live handle would hand its reader another block's bytes)."""
    q = InflightSource("disk")
    a, b = torch.full((2, 4), 1.0), torch.full((2, 4), 2.0)
    q.put([b"a" * 16, b"b" * 16], [a, b], [None, None])
    (held,) = q.match_run([b"a" * 16], 0, [])
    given: list[torch.Tensor] = []
    q.drop([b"a" * 16, b"b" * 16])
    q.recycle([a, b], given.extend)
    assert [t is b for t in given] == [True]  # b had no reader; a waits for its handle
    assert torch.equal(held.data, torch.full((2, 4), 1.0))
    held.release()
    assert len(given) == 2 and given[1] is a
    held.release()  # idempotent: the buffer is not given twice
    assert len(given) == 2
    uncounted = SnapshotBlock(q, b"x" * 16, a, None)  # a handle the source never handed out: releasing gives nothing
    uncounted.release()
    assert len(given) == 2


def test_staging_keeps_warm_buffers_and_refills_them() -> None:
    staging = StagingPool(SMALL, max_bytes=64 * SMALL.block_size_bytes)
    staging.keep_warm(8 * SMALL.block_size_bytes)
    assert staging.spare_count() == 8
    taken = staging.take(5)
    assert staging.spare_count() == 3
    assert staging.refill() == 5 and staging.spare_count() == 8
    staging.give(taken)
    assert staging.spare_count() == 13  # given back: kept (up to the maximum), warm or not
    assert staging.refill() == 0
