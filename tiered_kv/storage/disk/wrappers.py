"""Wrapper backends: a pass-through base, and a gate that holds writes until it is opened.

Built like zarr's ``WrapperStore``: :class:`WrapperBackend` forwards every call to the backend it wraps, so a
wrapper overrides only what it changes. :class:`GatedBackend` lets a test (or an operator's experiment) stall
the disk at a chosen moment and step past it, with no sleeps: writes block while the gate is closed, the test
waits until a writer is blocked (:meth:`GatedBackend.wait_blocked`), checks what serving does meanwhile, then
opens the gate.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Sequence

from .backend import DiskBackend, IoOp

__all__ = ["GatedBackend", "WrapperBackend"]


class WrapperBackend(DiskBackend):
    """Forwards everything to ``inner``; subclass it and override what the wrapper changes.

    Args:
        inner: the backend doing the real I/O.
    """

    def __init__(self, inner: DiskBackend) -> None:
        self.inner = inner
        self.name = f"{type(self).__name__}({inner.name})"
        self.accepts_cuda = inner.accepts_cuda

    def open(self, paths: Sequence[str | os.PathLike[str]], *, readonly: bool) -> None:
        """Open the wrapped backend."""
        self.inner.open(paths, readonly=readonly)
        self.direct_io = self.inner.direct_io

    def close(self) -> None:
        """Close the wrapped backend."""
        self.inner.close()

    def sync(self) -> None:
        """Sync the wrapped backend."""
        self.inner.sync()

    def pwrite_blocks(self, ops: Sequence[IoOp]) -> None:
        """Write through the wrapped backend."""
        self.inner.pwrite_blocks(ops)

    def pread_blocks(self, ops: Sequence[IoOp]) -> list[OSError | None]:
        """Read through the wrapped backend."""
        return self.inner.pread_blocks(ops)


class GatedBackend(WrapperBackend):
    """Holds every write batch while the gate is closed (reads pass); opened by default.

    Args:
        inner: the backend doing the real I/O.
        closed: start with the gate closed.
        max_wait_s: a blocked write gives up after this long with ``OSError(ETIMEDOUT)``, so a test that forgets
            to open the gate fails instead of hanging.

    Attributes:
        blocked: write batches waiting at the gate now.
        passed: write batches that went through.
    """

    def __init__(self, inner: DiskBackend, *, closed: bool = False, max_wait_s: float = 60.0) -> None:
        super().__init__(inner)
        self.max_wait_s = max_wait_s
        self.blocked = 0
        self.passed = 0
        self._open = not closed
        self._cond = threading.Condition()

    def close_gate(self) -> None:
        """Hold later write batches until :meth:`open_gate`."""
        with self._cond:
            self._open = False

    def open_gate(self) -> None:
        """Let every held and later write batch through."""
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def wait_blocked(self, n: int = 1, timeout: float = 60.0) -> bool:
        """Wait until at least ``n`` write batches are held at the gate; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self.blocked >= n, timeout)

    def pwrite_blocks(self, ops: Sequence[IoOp]) -> None:
        """Wait for the gate to be open, then write through the wrapped backend."""
        with self._cond:
            if not self._open:
                self.blocked += 1
                self._cond.notify_all()
                try:
                    if not self._cond.wait_for(lambda: self._open, self.max_wait_s):
                        raise OSError(errno.ETIMEDOUT, f"gated write held for {self.max_wait_s} s: gate never opened")
                finally:
                    self.blocked -= 1
            self.passed += 1
        self.inner.pwrite_blocks(ops)
