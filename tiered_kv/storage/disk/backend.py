"""The I/O backend interface of the disk tier.

A backend moves bytes between memory buffers and a fixed set of already-sized data files. It knows
nothing about slots, checksums or the registry: :class:`~tiered_kv.storage.disk.store.DiskStore` maps
slots to ``(file_index, offset)`` pairs and hands the backend whole batches, so a backend can run the
I/O of one batch in parallel.

Buffers are 1-D contiguous ``torch.uint8`` tensors. A backend with ``accepts_cuda`` takes CUDA tensors
too; others only CPU tensors. Offsets handed to a backend are multiples of :data:`SLOT_ALIGNMENT` and
the store guarantees ``offset + round_up(len(buffer), SLOT_ALIGNMENT)`` stays inside the slot, so a
backend that needs aligned lengths (O_DIRECT) may pad a transfer up to the alignment.

Errors: backends raise (or return) plain :class:`OSError` with a meaningful ``errno``; the store
translates them at its boundary (ENOSPC -> ``DiskFullError``, anything else -> ``DiskTierError``).
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["SLOT_ALIGNMENT", "DirtyFiles", "DiskBackend", "IoOp", "round_up"]

#: Slots start and end on this boundary: the O_DIRECT and GPUDirect Storage unit.
SLOT_ALIGNMENT = 4096


def round_up(n: int, align: int = SLOT_ALIGNMENT) -> int:
    """Round ``n`` up to a multiple of ``align``."""
    return (n + align - 1) // align * align


class DirtyFiles:
    """The data files written since the last sync (thread-safe): what a backend's ``sync`` must fdatasync."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: set[int] = set()

    def mark(self, file_indices: Iterable[int]) -> None:
        """Note writes to these files (even failed ones: a failed batch may have written some bytes)."""
        with self._lock:
            self._files.update(file_indices)

    def sync(self, fds: Sequence[int]) -> None:
        """``fdatasync`` ``fds[i]`` of every file written since the last sync.

        Raises:
            OSError: a sync failed; every file of this round stays marked, so the next sync retries it.
        """
        with self._lock:
            dirty, self._files = self._files, set()
        try:
            for index in sorted(dirty):
                os.fdatasync(fds[index])
        except OSError:
            self.mark(dirty)
            raise


#: Computes a block's checksum from an op's buffer.
ChecksumFn = Callable[["torch.Tensor | np.ndarray"], int]


class IoOp(NamedTuple):
    """One block transfer: ``buffer`` to/from ``offset`` bytes into data file ``file_index``.

    ``buffer`` is a 1-D uint8 tensor, or for a backend with ``accepts_numpy`` possibly a 1-D uint8 numpy array.
    """

    file_index: int
    offset: int
    buffer: torch.Tensor | np.ndarray


def buffer_tensor(buf: torch.Tensor | np.ndarray) -> torch.Tensor:
    """An op's buffer as a tensor sharing its memory (for backends and wrappers that work on tensors)."""
    return buf if isinstance(buf, torch.Tensor) else torch.from_numpy(buf)


def buffer_array(buf: torch.Tensor | np.ndarray) -> np.ndarray:
    """An op's buffer (in host memory) as a numpy array sharing its memory."""
    return buf if isinstance(buf, np.ndarray) else buf.numpy()


class DiskBackend(ABC):
    """Reads and writes byte ranges of a fixed list of data files, many at a time.

    Lifecycle: construct, :meth:`open` once, any number of :meth:`pwrite_blocks` / :meth:`pread_blocks` /
    :meth:`sync` calls (from several threads at once), :meth:`close` (idempotent).

    Capability flags (class or instance attributes):
        name: short name reported in ``DiskStore.backend_name`` and stats.
        accepts_cuda: buffers may be CUDA tensors (no staging copy through host memory).
        direct_io: the page cache is bypassed (O_DIRECT or GPUDirect Storage); set after :meth:`open`.
        accepts_numpy: buffers may also be 1-D uint8 numpy arrays (host memory without a tensor object per block:
            building one costs microseconds, a numpy row a fraction of one). Wrappers leave it False.
    """

    name: str = "abstract"
    accepts_cuda: bool = False
    direct_io: bool = False
    accepts_numpy: bool = False

    @abstractmethod
    def open(self, paths: Sequence[str | os.PathLike[str]], *, readonly: bool) -> None:
        """Open the data files (they exist and are already sized by the store).

        Raises:
            OSError: a file cannot be opened.
        """

    @abstractmethod
    def pwrite_blocks(self, ops: Sequence[IoOp]) -> None:
        """Write every op's buffer at its offset; returns when all writes have finished.

        Every op is attempted (and has finished) before this returns or raises, so the caller may
        reuse the buffers and slots afterwards either way.

        Raises:
            OSError: at least one write failed (the first error; the others are logged).
        """

    @abstractmethod
    def pread_blocks(self, ops: Sequence[IoOp]) -> list[OSError | None]:
        """Fill every op's buffer from its offset; returns one result per op (None = read OK).

        A failing read does not stop the others; its buffer content is undefined.
        """

    def pwrite_blocks_checksummed(self, ops: Sequence[IoOp], checksum: ChecksumFn) -> list[int]:
        """:meth:`pwrite_blocks`, also returning ``checksum(op.buffer)`` of each op's bytes as the caller handed them.

        A backend with I/O workers computes each checksum in the worker, just before that block's write, so
        checksums overlap with I/O instead of running serially on the caller; this default computes them here
        first, then writes through :meth:`pwrite_blocks` (what wrappers rely on).
        """
        sums = [checksum(op.buffer) for op in ops]
        self.pwrite_blocks(ops)
        return sums

    def pread_blocks_checksummed(
        self, ops: Sequence[IoOp], checksum: ChecksumFn
    ) -> tuple[list[OSError | None], list[int | None]]:
        """:meth:`pread_blocks`, also returning ``checksum(op.buffer)`` of each block read (None where it failed).

        As for writes, a backend with I/O workers computes them in the worker right after each read.
        """
        results = self.pread_blocks(ops)
        return results, [checksum(op.buffer) if r is None else None for op, r in zip(ops, results)]

    @abstractmethod
    def sync(self) -> None:
        """Make every completed write durable (``fdatasync`` of the files written since the last sync).

        Raises:
            OSError: the sync failed (the data written since the last sync may be lost).
        """

    @abstractmethod
    def close(self) -> None:
        """Release files and threads; idempotent. Does not sync (the store syncs first)."""
