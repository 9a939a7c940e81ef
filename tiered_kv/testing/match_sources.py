"""MatchSourceTests: the conformance suite of :class:`tiered_kv.sources.MatchSource` implementations.

Subclass it and implement :meth:`MatchSourceTests.open_source` (a context manager yielding a source that holds
exactly the given entries); every expectation comes from the entries (a dict model), never from the source::

    class TestMySource(MatchSourceTests):
        @contextlib.contextmanager
        def open_source(self, entries, tmp_path):
            src = MySource(...)
            src.put(entries)
            yield src
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..hashing import compute_sequence_hashes
from ..sources import InflightSource, MatchSource
from ..tokens import encode_tokens

__all__ = ["MatchSourceTests", "SourceEntry"]

#: A small geometry: 2 layers, K and V, 4 tokens per block, 8 inner, float32.
SMALL = ModelConfig(num_layers=2, inner_dim=8, page_size=4, dtype="float32")


@dataclass(frozen=True)
class SourceEntry:
    """One block a source under test holds: its hash, bytes, token bytes and parent."""

    sequence_hash: bytes
    data: torch.Tensor
    tokens: bytes | None
    parent: bytes | None


def _higher(entry: SourceEntry) -> MatchSource:
    """A higher source holding one entry (a queue of snapshots, the simplest real source)."""
    src = InflightSource("higher")
    src.put([entry.sequence_hash], [entry.data], [entry.tokens], [entry.parent])
    return src


class MatchSourceTests:
    """Conformance suite for a :class:`~tiered_kv.sources.MatchSource`; subclass it and implement
    :meth:`open_source`. Expectations come from the entries (a dict model), never from the source itself."""

    #: Geometry of the entries' bytes.
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
    def _check_run(self, src: MatchSource, run: list[Any], want: list[SourceEntry]) -> None:
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
            run = src.match_run(hashes, 0, (_higher(chain[3]),))
            self._check_run(src, run, chain[:3])
            src.release_blocks(run)
            run = src.match_run(hashes, 3, (_higher(chain[3]),))
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


