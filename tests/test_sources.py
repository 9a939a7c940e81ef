"""Every match source passes one conformance suite, checked against a plain dict model of what it holds."""

from __future__ import annotations

import contextlib
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from kvdata import SMALL

from tiered_kv import (
    DiskConfig,
    KvBlockManager,
    KvBlockManagerConfig,
    LayoutConfig,
    ModelConfig,
    compute_sequence_hashes,
)
from tiered_kv.sources import InflightSource, MatchSource
from tiered_kv.tokens import encode_tokens


@dataclass(frozen=True)
class SourceEntry:
    """One block a source under test holds: its hash, bytes, token bytes and parent."""

    sequence_hash: bytes
    data: torch.Tensor
    tokens: bytes | None
    parent: bytes | None


class _Higher:
    """A higher source that holds ``held`` (only ``may_hold`` is asked of it)."""

    tier = "higher"

    def __init__(self, held: set[bytes]) -> None:
        self.held = held

    def may_hold(self, sequence_hash: bytes) -> bool:
        return sequence_hash in self.held


class MatchSourceTests:
    """Conformance suite for a :class:`~tiered_kv.sources.MatchSource`; subclass it and implement
    :meth:`open_source`. Expectations come from the entries (a dict model), never from the source itself."""

    model: ModelConfig = SMALL
    #: The source keeps token bytes (and checks ``expected``); the remote tier does not.
    stores_tokens: bool = True
    #: The source keeps parents; the remote tier does not.
    stores_parents: bool = True
    #: ``may_hold`` is exact (False for the remote tier, which answers True and asks in ``match_run``).
    exact_may_hold: bool = True

    def open_source(self, entries: list[SourceEntry], tmp_path: Path) -> contextlib.AbstractContextManager[MatchSource]:
        """A source holding exactly ``entries`` (a context manager: closed after the test)."""
        raise NotImplementedError

    def entries(self) -> list[SourceEntry]:
        """Two chains of 6 blocks with distinct tokens and bytes."""
        page = self.model.page_size
        out = []
        for c in range(2):
            toks = [[c * 10_000 + i * page + t for t in range(page)] for i in range(6)]
            hs = compute_sequence_hashes([t for block in toks for t in block], page)
            for i, h in enumerate(hs):
                g = torch.Generator().manual_seed(c * 100 + i)
                data = torch.randn(self.model.block_shape, generator=g).to(self.model.torch_dtype)
                out.append(SourceEntry(bytes(h), data, encode_tokens(toks[i]), bytes(hs[i - 1]) if i else None))
        return out

    # -------------------------------------------------------------------------------------------------- tests
    def _check_run(self, src: MatchSource, run: list, want: list[SourceEntry]) -> None:
        assert [b.sequence_hash for b in run] == [e.sequence_hash for e in want]
        if run:
            data, bad = src.gather(run)
            assert bad == []
            for i, e in enumerate(want):
                assert torch.equal(data[i].cpu(), e.data), f"bytes of block {i} differ from what was stored"

    def test_may_hold_and_contains(self, tmp_path: Path) -> None:
        entries = self.entries()
        absent = compute_sequence_hashes(list(range(99_000, 99_000 + self.model.page_size)), self.model.page_size)[0]
        with self.open_source(entries, tmp_path) as src:
            for e in entries:
                assert src.may_hold(e.sequence_hash) and e.sequence_hash in src
            assert bytes(absent) not in src
            assert src.may_hold(bytes(absent)) is (not self.exact_may_hold)

    def test_run_from_start_and_from_the_middle(self, tmp_path: Path) -> None:
        entries = self.entries()
        chain = entries[:6]
        hashes = [e.sequence_hash for e in chain]
        with self.open_source(entries, tmp_path) as src:
            run = src.match_run(hashes, 0, ())
            self._check_run(src, run, chain)
            src.release_blocks(run)
            run = src.match_run(hashes, 2, ())
            self._check_run(src, run, chain[2:])
            src.release_blocks(run)

    def test_run_stops_at_the_first_missing_hash(self, tmp_path: Path) -> None:
        entries = self.entries()
        a, b = entries[:6], entries[6:]
        hole = b"\x00" * len(a[0].sequence_hash)
        hashes = [e.sequence_hash for e in a[:3]] + [hole] + [e.sequence_hash for e in a[3:]]
        with self.open_source(entries, tmp_path) as src:
            run = src.match_run(hashes, 0, ())
            self._check_run(src, run, a[:3])
            src.release_blocks(run)
            mixed = [a[0].sequence_hash, b[1].sequence_hash]  # both held: a run is hashes held, in order
            run = src.match_run(mixed, 0, ())
            self._check_run(src, run, [a[0], b[1]])
            src.release_blocks(run)

    def test_run_yields_to_higher_sources(self, tmp_path: Path) -> None:
        entries = self.entries()
        chain = entries[:6]
        hashes = [e.sequence_hash for e in chain]
        with self.open_source(entries, tmp_path) as src:
            # A block a higher source holds ends the run (that source serves it), except at the run's start.
            run = src.match_run(hashes, 0, (_Higher({hashes[3]}),))
            self._check_run(src, run, chain[:3])
            src.release_blocks(run)
            run = src.match_run(hashes, 3, (_Higher({hashes[3]}),))
            self._check_run(src, run, chain[3:])
            src.release_blocks(run)

    def test_expected_tokens_end_the_run(self, tmp_path: Path) -> None:
        entries = self.entries()
        chain = entries[:6]
        hashes = [e.sequence_hash for e in chain]
        expected = [e.tokens for e in chain]
        expected[2] = encode_tokens([7] * self.model.page_size)  # a collision: same hash, other tokens
        with self.open_source(entries, tmp_path) as src:
            run = src.match_run(hashes, 0, (), expected)  # type: ignore[arg-type]
            self._check_run(src, run, chain[:2] if self.stores_tokens else chain)
            src.release_blocks(run)

    def test_tokens_parents_and_release(self, tmp_path: Path) -> None:
        entries = self.entries()
        chain = entries[6:]
        with self.open_source(entries, tmp_path) as src:
            run = src.match_run([e.sequence_hash for e in chain], 0, ())
            assert len(run) == len(chain)
            if self.stores_tokens:
                assert src.tokens_of(run) == [e.tokens for e in chain]
            if self.stores_parents:
                assert src.parents_of(run) == [e.parent for e in chain]
            src.release_blocks(run)
            assert all(b.released for b in run)
            src.release_blocks(run)  # releasing twice is harmless


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
