"""The POSIX backend's buffers: tensors, or numpy rows where nothing overrides its transfers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from tiered_kv.storage.disk._posix import PosixBackend
from tiered_kv.storage.disk.backend import IoOp


class _Plain(PosixBackend):
    pass


class _HooksReads(PosixBackend):
    def pread_blocks(self, ops: Sequence[IoOp]) -> list[OSError | None]:
        return super().pread_blocks([IoOp(op.file_index, op.offset, op.buffer.clone()) for op in ops])  # type: ignore[union-attr]


class _HooksAndSaysSo(PosixBackend):
    accepts_numpy = True

    def pread_blocks(self, ops: Sequence[IoOp]) -> list[OSError | None]:
        return super().pread_blocks(ops)


def test_a_subclass_that_hooks_transfers_gets_tensors_unless_it_says_otherwise() -> None:
    assert PosixBackend.accepts_numpy and _Plain.accepts_numpy
    assert not _HooksReads.accepts_numpy
    assert _HooksAndSaysSo.accepts_numpy


@pytest.mark.parametrize("direct", [False, None])
def test_numpy_rows_and_tensors_round_trip_and_bad_rows_are_refused(tmp_path: Path, direct: bool | None) -> None:
    path = tmp_path / "f"
    size = 4 * 4096
    with open(path, "wb") as f:
        f.truncate(8 * size)
    backend = PosixBackend(direct=direct)
    backend.open([path], readonly=False)
    try:
        rows = np.zeros((3, size), dtype=np.uint8)  # not necessarily 4 KiB-aligned: the bounce path covers it
        rows[0] = 7
        rows[1] = 9
        src = torch.full((size,), 5, dtype=torch.uint8)
        backend.pwrite_blocks([IoOp(0, 0, rows[0]), IoOp(0, size, rows[1]), IoOp(0, 2 * size, src)])
        back = np.zeros((3, size), dtype=np.uint8)
        dst = torch.zeros(size, dtype=torch.uint8)
        assert backend.pread_blocks([IoOp(0, 0, back[0]), IoOp(0, size, back[1]), IoOp(0, 2 * size, dst)]) == [
            None, None, None
        ]
        assert (back[0] == 7).all() and (back[1] == 9).all() and bool((dst == 5).all())
        with pytest.raises(ValueError, match="contiguous 1-D uint8"):
            backend.pread_blocks([IoOp(0, 0, np.zeros(2 * size, dtype=np.uint8)[::2])])
        with pytest.raises(ValueError, match="contiguous 1-D uint8"):
            backend.pread_blocks([IoOp(0, 0, np.zeros(size // 2, dtype=np.int16))])
    finally:
        backend.close()
