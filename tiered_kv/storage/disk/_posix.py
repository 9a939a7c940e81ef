"""POSIX backend: ``pwrite``/``pread`` from a thread pool, O_DIRECT where the filesystem accepts it.

Why a thread pool: ``os.pwrite``/``os.pread`` release the GIL, so N workers keep N requests in flight
(an NVMe drive needs several to reach its bandwidth; a single synchronous stream is ``fio psync``).

O_DIRECT needs the buffer address, the length and the file offset aligned (we use 4 KiB). Offsets are
aligned by the slot layout. Buffers handed in by the store are usually torch tensors whose storage is
not guaranteed 4 KiB-aligned and whose length need not be a multiple of 4 KiB; those go through a
per-thread aligned bounce buffer (one memcpy, far cheaper than the disk). Aligned buffers of aligned
length are written in place.

The mode is probed once at :meth:`PosixBackend.open` (tmpfs and some FUSE/network filesystems refuse
O_DIRECT); the result is logged on the ``tiered_kv.disk`` logger. Either way :meth:`sync` fdatasyncs:
O_DIRECT skips the page cache but not the drive's volatile write cache, nor the metadata of the
unwritten extents that ``posix_fallocate`` leaves behind.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from .backend import SLOT_ALIGNMENT, ChecksumFn, DirtyFiles, DiskBackend, IoOp, buffer_array, round_up

__all__ = ["PosixBackend", "aligned_empty", "probe_direct_io"]

logger = logging.getLogger("tiered_kv.disk")

_O_DIRECT: int = getattr(os, "O_DIRECT", 0)


def aligned_empty(nbytes: int, align: int = SLOT_ALIGNMENT) -> torch.Tensor:
    """A new uninitialised CPU ``uint8`` tensor of ``nbytes`` whose first byte is ``align``-aligned."""
    raw = np.empty(nbytes + align, dtype=np.uint8)
    start = (-raw.ctypes.data) % align
    return torch.from_numpy(raw[start : start + nbytes])


def probe_direct_io(directory: str | os.PathLike[str]) -> bool:
    """Whether files in ``directory`` accept O_DIRECT aligned writes and reads (a throwaway file is used)."""
    if not _O_DIRECT:
        return False
    probe = os.path.join(os.fspath(directory), f".direct-probe-{os.getpid()}-{threading.get_ident()}")
    buf = aligned_empty(SLOT_ALIGNMENT).numpy()
    buf[:] = 0xA5
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | _O_DIRECT, 0o600)
    except OSError:
        return False
    try:
        os.pwrite(fd, buf.data, 0)
        back = aligned_empty(SLOT_ALIGNMENT).numpy()
        os.preadv(fd, [back.data], 0)
        return bool(np.array_equal(buf, back))
    except OSError:
        return False
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)


def _probe_direct_read(path: str) -> bool:
    """Read-only probe: can ``path`` be opened and read with O_DIRECT? (nothing is written)."""
    if not _O_DIRECT:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | _O_DIRECT)
    except OSError:
        return False
    try:
        if os.fstat(fd).st_size >= SLOT_ALIGNMENT:
            os.preadv(fd, [aligned_empty(SLOT_ALIGNMENT).numpy().data], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        done = os.pwrite(fd, view, offset)
        if done <= 0:  # pragma: no cover - pwrite reports errors by raising
            raise OSError(errno.EIO, "pwrite wrote nothing")
        view = view[done:]
        offset += done


def _pread_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        done = os.preadv(fd, [view], offset)
        if done == 0:
            raise OSError(errno.EIO, f"short read at offset {offset}: end of file")
        view = view[done:]
        offset += done


class PosixBackend(DiskBackend):
    """``pwrite``/``pread`` on a thread pool, with O_DIRECT when available.

    Args:
        direct: True forces O_DIRECT (``open`` raises OSError(EINVAL) if the filesystem refuses it),
            False forces buffered I/O, None (default) probes once and falls back to buffered I/O.
        max_workers: I/O threads, i.e. requests in flight (8 suits one NVMe drive).
    """

    name = "posix"
    accepts_cuda = False
    accepts_numpy = True

    def __init_subclass__(cls, **kwargs: object) -> None:
        # A subclass that hooks the transfers may treat op.buffer as a tensor: it gets tensors unless it says
        # otherwise (accepts_numpy in its own body).
        super().__init_subclass__(**kwargs)
        hooks = ("pread_blocks", "pwrite_blocks", "pread_blocks_checksummed", "pwrite_blocks_checksummed",
                 "_read_one", "_write_one")
        if "accepts_numpy" not in cls.__dict__ and any(h in cls.__dict__ for h in hooks):
            cls.accepts_numpy = False

    def __init__(self, *, direct: bool | None = None, max_workers: int = 8) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        self._want_direct = direct
        self._max_workers = max_workers
        self._fds: list[int] = []
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._dirty = DirtyFiles()
        self.direct_io = False

    # -- lifecycle -------------------------------------------------------------------------------
    def open(self, paths: Sequence[str | os.PathLike[str]], *, readonly: bool) -> None:
        """Open the data files, choosing O_DIRECT or buffered I/O (see the class docstring)."""
        if self._pool is not None:
            raise RuntimeError("backend already open")
        str_paths = [os.fspath(p) for p in paths]
        if self._want_direct is None:
            if not str_paths:
                direct = False
            elif readonly:
                direct = _probe_direct_read(str_paths[0])
            else:
                direct = probe_direct_io(os.path.dirname(str_paths[0]) or ".")
        else:
            direct = self._want_direct
        if direct and not _O_DIRECT:
            raise OSError(errno.EINVAL, "O_DIRECT is not available on this platform")
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC | (_O_DIRECT if direct else 0)
        fds: list[int] = []
        try:
            for p in str_paths:
                fds.append(os.open(p, flags))
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        self._fds = fds
        self.direct_io = direct
        self._pool = ThreadPoolExecutor(max_workers=self._max_workers, thread_name_prefix="tiered-kv-disk-io")
        logger.info(
            "posix disk backend: %s I/O on %d file(s) with %d threads%s",
            "O_DIRECT" if direct else "buffered",
            len(fds),
            self._max_workers,
            "" if direct or self._want_direct is False else " (O_DIRECT refused by the filesystem; fdatasync on sync)",
        )

    def close(self) -> None:
        """Stop the threads and close the files; idempotent."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        fds, self._fds = self._fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                logger.warning("closing a data file failed", exc_info=True)

    # -- I/O -------------------------------------------------------------------------------------
    def _bounce(self, nbytes: int) -> np.ndarray:
        buf: np.ndarray | None = getattr(self._local, "buf", None)
        if buf is None or buf.nbytes < nbytes:
            buf = aligned_empty(round_up(nbytes)).numpy()
            self._local.buf = buf
        return buf[:nbytes]

    def _is_aligned(self, arr: np.ndarray) -> bool:
        return arr.ctypes.data % SLOT_ALIGNMENT == 0 and arr.nbytes % SLOT_ALIGNMENT == 0

    def _write_one(self, op: IoOp) -> None:
        arr = buffer_array(op.buffer)
        fd = self._fds[op.file_index]
        if self.direct_io and not self._is_aligned(arr):
            n = arr.nbytes
            bounce = self._bounce(round_up(n))
            bounce[:n] = arr
            bounce[n:] = 0  # the slot's padding: deterministic bytes, never read back as data
            _pwrite_all(fd, bounce.data, op.offset)
        else:
            _pwrite_all(fd, arr.data, op.offset)

    def _read_one(self, op: IoOp) -> None:
        arr = buffer_array(op.buffer)
        fd = self._fds[op.file_index]
        if self.direct_io and not self._is_aligned(arr):
            n = arr.nbytes
            bounce = self._bounce(round_up(n))
            _pread_all(fd, bounce.data, op.offset)
            arr[:] = bounce[:n]
        else:
            _pread_all(fd, arr.data, op.offset)

    def _run(self, ops: Sequence[IoOp], one: Callable[[int], None]) -> list[OSError | None]:
        """Run ``one(i)`` for every op on the pool; every op finishes before this returns."""
        pool = self._pool
        if pool is None:
            raise OSError(errno.EBADF, "disk backend is closed")
        for op in ops:
            b = op.buffer
            if isinstance(b, np.ndarray):
                if b.dtype != np.uint8 or b.ndim != 1 or not b.flags.c_contiguous:
                    raise ValueError("posix backend buffers must be contiguous 1-D uint8 arrays or CPU tensors")
            elif b.device.type != "cpu" or b.dtype != torch.uint8 or b.dim() != 1:
                raise ValueError("posix backend buffers must be contiguous 1-D uint8 arrays or CPU tensors")
        results: list[OSError | None] = [None] * len(ops)

        def chunk(start: int, stop: int) -> None:
            for i in range(start, stop):
                try:
                    one(i)
                except OSError as exc:
                    results[i] = exc

        # Contiguous chunks, one per worker: one future per worker instead of one per block keeps the
        # Python overhead per 64 KiB block small.
        n = len(ops)
        if n == 1:
            chunk(0, 1)
            return results
        per = -(-n // self._max_workers)
        futures: list[Future[None]] = [pool.submit(chunk, s, min(s + per, n)) for s in range(0, n, per)]
        for f in futures:
            f.result()
        return results

    def pwrite_blocks(self, ops: Sequence[IoOp]) -> None:
        """Write all ops in parallel; raise the first OSError after every op has finished."""
        if not ops:
            return
        self._raise_first(ops, self._run(ops, lambda i: self._write_one(ops[i])))

    def _raise_first(self, ops: Sequence[IoOp], results: list[OSError | None]) -> None:
        """After a write batch: mark its files dirty, then raise the first error (the others are logged)."""
        self._dirty.mark(op.file_index for op in ops)  # a failed batch too: it may have written some files
        errors = [r for r in results if r is not None]
        if errors:
            for extra in errors[1:]:
                logger.debug("further write error in the same batch: %s", extra)
            raise errors[0]

    def pread_blocks(self, ops: Sequence[IoOp]) -> list[OSError | None]:
        """Read all ops in parallel; one result per op."""
        if not ops:
            return []
        return self._run(ops, lambda i: self._read_one(ops[i]))

    def pwrite_blocks_checksummed(self, ops: Sequence[IoOp], checksum: ChecksumFn) -> list[int]:
        """Write all ops in parallel, each worker checksumming its block just before writing it."""
        if type(self).pwrite_blocks is not PosixBackend.pwrite_blocks:  # a subclass hooks writes: honour it
            return super().pwrite_blocks_checksummed(ops, checksum)
        if not ops:
            return []
        sums = [0] * len(ops)

        def one(i: int) -> None:
            sums[i] = checksum(ops[i].buffer)
            self._write_one(ops[i])

        self._raise_first(ops, self._run(ops, one))
        return sums

    def pread_blocks_checksummed(
        self, ops: Sequence[IoOp], checksum: ChecksumFn
    ) -> tuple[list[OSError | None], list[int | None]]:
        """Read all ops in parallel, each worker checksumming its block right after reading it."""
        if type(self).pread_blocks is not PosixBackend.pread_blocks:  # a subclass hooks reads: honour it
            return super().pread_blocks_checksummed(ops, checksum)
        if not ops:
            return [], []
        sums: list[int | None] = [None] * len(ops)

        def one(i: int) -> None:
            self._read_one(ops[i])
            sums[i] = checksum(ops[i].buffer)

        return self._run(ops, one), sums

    def sync(self) -> None:
        """``fdatasync`` every file written since the last sync."""
        self._dirty.sync(self._fds)
