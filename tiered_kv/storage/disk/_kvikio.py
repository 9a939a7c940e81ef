"""kvikio backend: ``kvikio.CuFile`` reads and writes straight between GPU tensors and the data files.

GPUDirect Storage is used where the system has it; otherwise kvikio runs in its own compatibility mode
(POSIX I/O through a bounce buffer in its thread pool). kvikio needs libcuda at I/O time, so this backend
is only offered when CUDA is usable in this process and ``kvikio`` imports (:func:`kvikio_unavailable_reason`).
Buffers may be CUDA or CPU ``uint8`` tensors; kvikio splits each request into tasks on its own thread pool.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from .backend import DirtyFiles, DiskBackend, IoOp, buffer_tensor

__all__ = ["KvikioBackend", "kvikio_unavailable_reason"]

logger = logging.getLogger("tiered_kv.disk")


def kvikio_unavailable_reason() -> str | None:
    """None when the kvikio backend can work in this process, else a sentence saying why not."""
    try:
        if not torch.cuda.is_available():
            return "CUDA is not available in this process (torch.cuda.is_available() is False)"
    except Exception as exc:  # a broken driver install raises from deep inside torch
        return f"CUDA is not usable: {exc}"
    try:
        import kvikio  # noqa: F401
    except Exception as exc:  # ImportError, or a missing libcufile/libkvikio raising OSError
        return f"kvikio cannot be imported: {exc}"
    return None


def _as_kvikio_buffer(t: torch.Tensor) -> Any:
    # kvikio takes CUDA tensors through __cuda_array_interface__ and host memory through the buffer protocol.
    return t if t.is_cuda else t.numpy()


class KvikioBackend(DiskBackend):
    """Parallel ``CuFile.pwrite``/``pread`` of whole batches; ``sync`` is an ``fdatasync`` per written file."""

    name = "kvikio"
    accepts_cuda = True

    def __init__(self) -> None:
        reason = kvikio_unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        import kvikio
        import kvikio.defaults  # a submodule the package does not import itself

        self._kvikio: Any = kvikio
        self._files: list[Any] = []
        self._sync_fds: list[int] = []
        self._dirty = DirtyFiles()
        self.direct_io = False

    def open(self, paths: Sequence[str | os.PathLike[str]], *, readonly: bool) -> None:
        """Open a ``CuFile`` per data file (plus a plain fd for fdatasync)."""
        flags = "r" if readonly else "r+"
        try:
            for p in paths:
                self._files.append(self._kvikio.CuFile(os.fspath(p), flags))
                self._sync_fds.append(os.open(p, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC))
        except Exception as exc:
            self.close()
            if isinstance(exc, OSError):
                raise
            raise OSError(errno.EIO, f"kvikio could not open the data files: {exc}") from exc
        try:
            compat = bool(self._kvikio.defaults.is_compat_mode_preferred())
        except Exception:  # other kvikio versions spell it differently; the mode is only logged
            compat = True
        self.direct_io = not compat
        logger.info(
            "kvikio disk backend on %d file(s): %s",
            len(self._files),
            "GPUDirect Storage" if not compat else "compatibility mode (POSIX through kvikio's bounce buffers)",
        )

    def close(self) -> None:
        """Close every CuFile and fd; idempotent."""
        files, self._files = self._files, []
        for f in files:
            try:
                f.close()
            except Exception:
                logger.warning("closing a kvikio CuFile failed", exc_info=True)
        fds, self._sync_fds = self._sync_fds, []
        for fd in fds:
            os.close(fd)

    def _submit(self, ops: Sequence[IoOp], write: bool) -> list[OSError | None]:
        results: list[OSError | None] = [None] * len(ops)
        futures: list[tuple[int, Any, int]] = []
        for i, op in enumerate(ops):
            f = self._files[op.file_index]
            buf = buffer_tensor(op.buffer)
            size = buf.numel()
            try:
                call = f.pwrite if write else f.pread
                futures.append((i, call(_as_kvikio_buffer(buf), size, op.offset), size))
            except Exception as exc:
                results[i] = exc if isinstance(exc, OSError) else OSError(errno.EIO, str(exc))
        # Wait for every submitted op, even after a failure: the caller may reuse buffers on return.
        for i, fut, size in futures:
            try:
                done = fut.get()
                if done != size:
                    results[i] = OSError(errno.EIO, f"kvikio transferred {done} of {size} bytes")
            except Exception as exc:
                results[i] = exc if isinstance(exc, OSError) else OSError(errno.EIO, str(exc))
        return results

    def pwrite_blocks(self, ops: Sequence[IoOp]) -> None:
        """Write all ops in parallel through kvikio; raise the first error after all have finished."""
        if not ops:
            return
        results = self._submit(ops, write=True)
        self._dirty.mark(op.file_index for op in ops)
        for r in results:
            if r is not None:
                raise r

    def pread_blocks(self, ops: Sequence[IoOp]) -> list[OSError | None]:
        """Read all ops in parallel through kvikio; one result per op."""
        if not ops:
            return []
        return self._submit(ops, write=False)

    def sync(self) -> None:
        """``fdatasync`` the files written since the last sync."""
        self._dirty.sync(self._sync_fds)
