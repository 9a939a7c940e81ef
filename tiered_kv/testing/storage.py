"""Conformance tests for a pool's block storage (:class:`~tiered_kv.storage.base.BlockStorage`).

A storage holds the bytes of ``num_blocks`` slots. The suite writes blocks the ways a pool and the movers do
(``scatter``; ``mutable_view`` layer by layer; ``stage_views`` borrowed or copied, on storages that stage;
``scatter`` then an edit through ``mutable_view``), makes them live with ``commit``, and reads them back every way
the storage declares (``gather`` with and without ``out``, ``read_view``, ``slot_view`` when ``direct_slots``,
``read_into`` when ``persistent``). Expected bytes come from a dict ``slot -> (hash, bytes)`` the suite keeps,
never from the storage. It also checks: a read view is a copy (writing into it changes nothing stored); a slot
reused after ``discard`` holds the new block; a discarded slot of a persistent storage is never read back as good
data; bad batches (shape, dtype) are refused with ``ValueError`` and change nothing; every dtype moves bit for bit,
padded geometries included; a persistent storage reopened at the same place has every committed block.

Run it on your storage::

    from tiered_kv.testing import BlockStorageTests

    class TestMyStorage(BlockStorageTests):
        def make_storage(self, model, num_blocks, path):
            return MyStorage(model, num_blocks, path)

        def reopen_storage(self, model, num_blocks, path):     # persistent storages only
            return MyStorage(model, num_blocks, path)

Needs pytest and hypothesis (``pip install tiered_kv[testing]``).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import ClassVar

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from ..config import ModelConfig
from ..errors import TieredKvError
from ..storage.base import BlockStorage
from ._data import DTYPES, ODD_MODEL, SMALL_MODEL, block_bytes, same, seq_hash

__all__ = ["BlockStorageTests", "WRITE_PATHS"]

#: The ways a block reaches its slot before ``commit``.
WRITE_PATHS = ("scatter", "layer_views", "stage_copy", "stage_borrow", "scatter_then_edit")


class _Model:
    """The suite's own record of what each live slot holds, and the write/read protocol it drives."""

    def __init__(self, storage: BlockStorage) -> None:
        self.storage = storage
        self.model = storage.model
        self.live: dict[int, bytes] = {}  # slot -> hash; its bytes are block_bytes(hash)
        self._borrowed: list[torch.Tensor] = []  # borrowed staging sources, kept intact until committed

    def paths(self) -> list[str]:
        """Write paths this storage declares (staging only where it stages)."""
        if self.storage.staging is not None or self.storage.persistent:
            return list(WRITE_PATHS)
        return [p for p in WRITE_PATHS if not p.startswith("stage")]

    def write(self, slots: Sequence[int], hashes: Sequence[bytes], how: str) -> None:
        s, model = self.storage, self.model
        data = torch.stack([block_bytes(h, model) for h in hashes])
        if how == "scatter_then_edit":
            for slot, h in zip(slots, hashes):
                self.write_scatter_then_edit(slot, h)
            return
        if how == "scatter":
            s.scatter(list(slots), data.clone())
        elif how == "layer_views":
            for slot, block in zip(slots, data):
                for layer in range(model.num_layers):
                    for outer in range(model.outer_dim):
                        s.mutable_view(slot, layer, outer).copy_(block[layer, outer])
        elif how == "stage_copy":
            src = data.clone()
            s.stage_views(list(slots), list(src), borrow=False)
            src.zero_()  # a copying stage owns its bytes: the caller may reuse the source at once
        elif how == "stage_borrow":
            src = data.clone()
            self._borrowed.append(src)
            s.stage_views(list(slots), list(src), borrow=True)
        else:
            raise ValueError(how)
        s.commit(list(slots), list(hashes))
        self._borrowed.clear()
        for slot, h in zip(slots, hashes):
            self.live[slot] = h

    def write_scatter_then_edit(self, slot: int, h: bytes) -> None:
        """Scatter wrong bytes, then rewrite every layer through ``mutable_view`` before the commit (a block
        scattered by a mover, then edited: the disk tier reads it back into staging)."""
        s, model = self.storage, self.model
        wrong = block_bytes(h + b"wrong", model).unsqueeze(0)
        s.scatter([slot], wrong)
        good = block_bytes(h, model)
        for layer in range(model.num_layers):
            for outer in range(model.outer_dim):
                s.mutable_view(slot, layer, outer).copy_(good[layer, outer])
        s.commit([slot], [h])
        self.live[slot] = h

    def discard(self, slots: Sequence[int]) -> None:
        self.storage.discard(list(slots), [self.live[s] for s in slots])
        for s in slots:
            del self.live[s]

    def expected(self, slots: Sequence[int]) -> torch.Tensor:
        return torch.stack([block_bytes(self.live[s], self.model) for s in slots])

    def check_gather(self, slots: Sequence[int]) -> None:
        s = self.storage
        got, bad = s.gather(list(slots))
        assert bad == [], f"gather({list(slots)}) reported failed blocks {bad}"
        assert tuple(got.shape) == (len(slots), *self.model.block_shape) and got.dtype == self.model.torch_dtype
        assert same(got.cpu(), self.expected(slots)), f"gather({list(slots)}) returned other bytes"
        out = torch.empty((len(slots), *self.model.block_shape), dtype=self.model.torch_dtype)
        got2, bad2 = s.gather(list(slots), out=out)
        assert bad2 == [] and same(got2.cpu(), self.expected(slots))
        assert same(out, self.expected(slots)), "gather(out=...) did not fill the caller's tensor"

    def check_views(self, slot: int) -> None:
        s, model = self.storage, self.model
        want = block_bytes(self.live[slot], model)
        for layer in range(model.num_layers):
            for outer in range(model.outer_dim):
                v = s.read_view(slot, layer, outer)
                assert same(v.cpu(), want[layer, outer]), f"read_view({slot}, {layer}, {outer}) differs"
        if s.direct_slots:
            v = s.slot_view(slot)
            assert tuple(v.shape) == tuple(model.block_shape) and v.is_contiguous()
            assert same(v.cpu(), want), f"slot_view({slot}) differs"
        if s.has_byte_rows:
            (row,) = s.byte_rows([slot])
            assert row.dtype == np.uint8 and row.shape == (model.block_size_bytes,) and row.flags.c_contiguous
            assert same(torch.from_numpy(row.copy()), want.contiguous().view(torch.uint8).reshape(-1)), (
                f"byte_rows([{slot}]) differs"
            )
        if s.persistent:
            batch = torch.empty((1, *model.block_shape), dtype=model.torch_dtype)
            assert s.read_into([slot], batch) == [] and same(batch[0], want), f"read_into([{slot}]) differs"
            one = torch.empty(model.block_shape, dtype=model.torch_dtype)
            assert s.read_into([slot], [one]) == [] and same(one, want), f"read_into([{slot}], [t]) differs"
            if s.reads_into_rows:
                row = np.zeros(model.block_size_bytes, dtype=np.uint8)
                assert s.read_into([slot], [row]) == [], f"read_into([{slot}], [row]) failed"
                assert same(torch.from_numpy(row), want.contiguous().view(torch.uint8).reshape(-1)), (
                    f"read_into([{slot}], [row]) differs"
                )


class BlockStorageTests:
    """Conformance tests for one block storage; subclass and implement :meth:`make_storage`.

    See the module docstring.
    """

    num_blocks: ClassVar[int] = 8
    #: Hypothesis examples of the random-operations test.
    max_examples: ClassVar[int] = 12

    def make_storage(self, model: ModelConfig, num_blocks: int, path: Path) -> BlockStorage:
        """A new, empty storage of ``num_blocks`` slots of ``model`` (``path``: a fresh directory it may use)."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_storage()")

    def reopen_storage(self, model: ModelConfig, num_blocks: int, path: Path) -> BlockStorage | None:
        """Open the storage at ``path`` again after ``close()`` (persistent storages); None: not persistent."""
        return None

    @pytest.fixture
    def storage(self, tmp_path: Path) -> Iterator[BlockStorage]:
        """A fresh storage of :attr:`num_blocks` blocks of the small model."""
        s = self.make_storage(SMALL_MODEL, self.num_blocks, tmp_path / "storage")
        try:
            yield s
        finally:
            s.close()

    # -- declarations ----------------------------------------------------------------------------------------------
    def test_declares_geometry_and_capabilities(self, storage: BlockStorage) -> None:
        assert isinstance(storage.tier, str) and storage.tier
        assert storage.num_blocks == self.num_blocks and storage.model == SMALL_MODEL
        assert isinstance(storage.device, torch.device)
        if storage.persistent:
            assert storage.staging is not None, "a persistent storage stages its mutable blocks"
        if storage.accepts_cuda:
            assert storage.persistent, "accepts_cuda is about read_into, which only persistent storages have"
        if not storage.direct_slots:
            with pytest.raises((NotImplementedError, ValueError)):
                storage.slot_view(0)
        if storage.reads_into_rows:
            assert storage.persistent, "reads_into_rows is about read_into, which only persistent storages have"
        if storage.has_byte_rows:
            assert storage.direct_slots and storage.device.type == "cpu", "byte rows are host memory, one per slot"
        else:
            with pytest.raises((NotImplementedError, ValueError)):
                storage.byte_rows([0])

    # -- round trips -----------------------------------------------------------------------------------------------
    @pytest.mark.parametrize("how", WRITE_PATHS)
    def test_write_commit_read_every_way(self, storage: BlockStorage, how: str) -> None:
        m = _Model(storage)
        if how not in m.paths():
            pytest.skip(f"the {storage.tier} storage does not stage blocks")
        slots = [5, 1, 2, 3, 7]  # scattered and consecutive runs, out of order
        hs = [seq_hash(f"rt-{how}", i) for i in range(len(slots))]
        m.write(slots, hs, how)
        m.check_gather(slots)
        m.check_gather(slots[::-1])
        for slot in slots:
            m.check_views(slot)

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_every_dtype_bit_for_bit(self, tmp_path: Path, dtype: str) -> None:
        model = ModelConfig(num_layers=2, inner_dim=64, page_size=8, dtype=dtype)
        s = self.make_storage(model, 4, tmp_path / "s")
        try:
            m = _Model(s)
            m.write([0, 1, 2, 3], [seq_hash(dtype, i) for i in range(4)], "scatter")
            m.check_gather([3, 0, 2, 1])
        finally:
            s.close()

    def test_padded_geometry(self, tmp_path: Path) -> None:
        """Blocks whose size is not a multiple of 4 KiB (padded slots on disk)."""
        s = self.make_storage(ODD_MODEL, 6, tmp_path / "s")
        try:
            m = _Model(s)
            for how in m.paths():
                if m.live:
                    m.discard(list(m.live))
                m.write([4, 1, 5], [seq_hash(f"odd-{how}", i) for i in range(3)], how)
                m.check_gather([1, 4, 5])
                m.check_views(4)
        finally:
            s.close()

    def test_read_view_is_not_a_way_to_write(self, storage: BlockStorage) -> None:
        m = _Model(storage)
        m.write([2], [seq_hash("ro", 0)], "scatter")
        v = storage.read_view(2, 0, 0)
        with contextlib.suppress(RuntimeError):  # a read-only view refuses: as good as a copy
            v.zero_()
        m.check_gather([2])

    def test_discarded_slot_is_reused(self, storage: BlockStorage) -> None:
        m = _Model(storage)
        m.write([0, 1, 2], [seq_hash("a", i) for i in range(3)], "scatter")
        m.discard([1])
        if storage.persistent:
            # A discarded block of a persistent storage is gone: never read back as good data.
            try:
                _, bad = storage.gather([1])
            except TieredKvError:
                pass
            else:
                assert bad == [0], "a discarded slot was read back as a good block"
        m.write([1], [seq_hash("b", 0)], "layer_views")
        m.check_gather([0, 1, 2])

    def test_unregistered_mutable_block_leaves_nothing(self, storage: BlockStorage) -> None:
        """A block filled layer by layer and freed without registration (``drop_stage``) does not leak into the
        next block written to its slot."""
        m = _Model(storage)
        junk = block_bytes(seq_hash("junk", 0), SMALL_MODEL)
        storage.mutable_view(3, 0, 0).copy_(junk[0, 0])
        storage.drop_stage(3)
        m.write([3], [seq_hash("after-drop", 0)], "layer_views")
        m.check_gather([3])

    def test_bad_batches_are_refused(self, storage: BlockStorage) -> None:
        m = _Model(storage)
        m.write([0, 1], [seq_hash("keep", i) for i in range(2)], "scatter")
        good = block_bytes(seq_hash("x", 0), SMALL_MODEL).unsqueeze(0)
        for bad in (good.float(), good[:, :1], good.expand(2, *SMALL_MODEL.block_shape), good[0]):
            with pytest.raises(ValueError):
                storage.scatter([0], bad)
        m.check_gather([0, 1])

    def test_reopen_keeps_committed_blocks(self, tmp_path: Path) -> None:
        path = tmp_path / "s"
        s = self.make_storage(SMALL_MODEL, self.num_blocks, path)
        m = _Model(s)
        try:
            m.write([0, 3, 6], [seq_hash("keep", i) for i in range(3)], "scatter")
            m.write([1], [seq_hash("keep", 9)], "layer_views")
            m.discard([3])
        finally:
            s.close()
        again = self.reopen_storage(SMALL_MODEL, self.num_blocks, path)
        if again is None:
            pytest.skip("not a persistent storage")
        try:
            m.storage = again
            m.check_gather(sorted(m.live))
        finally:
            again.close()

    def test_read_into_cuda(self, storage: BlockStorage) -> None:
        if not storage.accepts_cuda:
            pytest.skip(f"the {storage.tier} storage does not read into CUDA memory")
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        m = _Model(storage)
        m.write([0, 1], [seq_hash("cuda", i) for i in range(2)], "scatter")
        out = torch.empty((2, *SMALL_MODEL.block_shape), dtype=SMALL_MODEL.torch_dtype, device="cuda")
        assert storage.read_into([1, 0], out) == []
        assert same(out.cpu(), m.expected([1, 0]))

    # -- random operations -----------------------------------------------------------------------------------------
    def test_random_operations_against_model(self) -> None:
        """Hypothesis: writes (every path), discards and reads in random order against the dict model."""
        n = self.num_blocks
        op = st.one_of(
            st.tuples(st.just("write"), st.sets(st.integers(0, n - 1), min_size=1, max_size=4),
                      st.sampled_from(WRITE_PATHS)),
            st.tuples(st.just("discard"), st.sets(st.integers(0, n - 1), min_size=1, max_size=3),
                      st.just("")),
            st.tuples(st.just("read"), st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True),
                      st.just("")),
        )

        @settings(max_examples=self.max_examples, deadline=None, report_multiple_bugs=False)
        @given(ops=st.lists(op, min_size=5, max_size=25))
        def run(ops: list[tuple[str, object, str]]) -> None:
            with tempfile.TemporaryDirectory(prefix="tiered-kv-storage-") as tmp:
                s = self.make_storage(SMALL_MODEL, n, Path(tmp) / "s")
                try:
                    m = _Model(s)
                    serial = 0
                    for kind, arg, how in ops:
                        assert isinstance(arg, (set, list))
                        if kind == "write":
                            slots = sorted(x for x in arg if x not in m.live)  # a pool writes free slots only
                            if not slots:
                                continue
                            hs = [seq_hash("random", serial + i) for i in range(len(slots))]
                            serial += len(slots)
                            if how in m.paths():
                                m.write(slots, hs, how)
                        elif kind == "discard":
                            slots = sorted(x for x in arg if x in m.live)
                            if slots:
                                m.discard(slots)
                        else:
                            slots = [x for x in arg if x in m.live]
                            if slots:
                                m.check_gather(slots)
                                m.check_views(slots[0])
                    if m.live:
                        m.check_gather(sorted(m.live))
                finally:
                    s.close()

        run()
