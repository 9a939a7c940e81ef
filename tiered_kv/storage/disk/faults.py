"""A fault-injecting wrapper backend: the disk misbehaving on purpose, reproducibly.

:class:`FaultInjectingBackend` wraps any :class:`~tiered_kv.storage.disk.backend.DiskBackend` and, for each
block transfer with probability ``rate``, injects one of these faults:

=========  ======================================================================================
kind       effect
=========  ======================================================================================
eio        write: the block is not written and the batch raises ``OSError(EIO)``;
           read: that block's read reports ``OSError(EIO)``
enospc     write only: the block is not written and the batch raises ``OSError(ENOSPC)``
torn       write only: only a 4 KiB-aligned prefix of the block reaches the file, success is reported
bitflip    write: the block lands on disk with one byte flipped, success is reported;
           read: one byte of the returned buffer is flipped
=========  ======================================================================================

The silent kinds (torn, bitflip) are exactly what checksums exist for: a store above this wrapper must
report those blocks as corrupt and never return them as good. Counts per kind are in :attr:`injected`.
It is a product feature (the ``stress`` command drives the whole stack through it), not only a test aid.
"""

from __future__ import annotations

import errno
import random
import threading
from collections.abc import Iterable, Sequence

import torch

from .backend import SLOT_ALIGNMENT, DiskBackend, IoOp, buffer_tensor
from .wrappers import WrapperBackend

__all__ = ["FAULT_KINDS", "FaultInjectingBackend"]

#: Every fault kind the wrapper knows.
FAULT_KINDS = ("eio", "enospc", "torn", "bitflip")
_WRITE_KINDS = frozenset(FAULT_KINDS)
_READ_KINDS = frozenset({"eio", "bitflip"})


class FaultInjectingBackend(WrapperBackend):
    """Wraps ``inner`` and injects faults into a fraction ``rate`` of block transfers.

    Args:
        inner: the backend doing the real I/O.
        rate: probability in [0, 1] that a given block transfer gets a fault. May be changed later
            (e.g. set to 0 to store clean data first).
        seed: seed of the private random generator (same seed and same calls give the same faults).
        kinds: the fault kinds to draw from (see the module docstring).

    Attributes:
        injected: how many faults of each kind were injected so far.
    """

    accepts_cuda = False

    def __init__(
        self,
        inner: DiskBackend,
        rate: float,
        seed: int | None = None,
        kinds: Iterable[str] = FAULT_KINDS,
    ) -> None:
        kinds = tuple(kinds)
        unknown = [k for k in kinds if k not in FAULT_KINDS]
        if unknown or not kinds:
            raise ValueError(f"kinds must be a non-empty subset of {FAULT_KINDS}, got {kinds!r}")
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {rate!r}")
        super().__init__(inner)
        self.rate = rate
        self.kinds = kinds
        self.name = f"faults({inner.name})"
        self.injected: dict[str, int] = dict.fromkeys(FAULT_KINDS, 0)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    # open, close and sync pass through (WrapperBackend): syncs are never faulted, fsync failures are their own topic.

    def _draw(self, allowed: frozenset[str]) -> tuple[str | None, int]:
        """A fault kind (or None) and a random int for where to apply it, under the lock."""
        kinds = [k for k in self.kinds if k in allowed]
        with self._lock:
            if not kinds or self.rate <= 0.0 or self._rng.random() >= self.rate:
                return None, 0
            kind = self._rng.choice(kinds)
            self.injected[kind] += 1
            return kind, self._rng.randrange(1 << 62)

    @staticmethod
    def _flip(buf: torch.Tensor, where: int) -> None:
        if buf.numel():
            i = where % buf.numel()
            buf[i : i + 1].bitwise_xor_(0xFF)

    def pwrite_blocks(self, ops: Sequence[IoOp]) -> None:
        """Write through the inner backend with faults applied per block."""
        real: list[IoOp] = []
        failure: OSError | None = None
        for op in ops:
            kind, where = self._draw(_WRITE_KINDS)
            if kind is None:
                real.append(op)
            elif kind in ("eio", "enospc"):
                code = errno.EIO if kind == "eio" else errno.ENOSPC
                failure = failure or OSError(code, f"injected {kind} (file {op.file_index} offset {op.offset})")
            elif kind == "torn":
                buf = buffer_tensor(op.buffer)
                n = buf.numel()
                # A torn write lands whole sectors: keep an aligned prefix shorter than the block.
                prefix = (where % max(n, 1)) // SLOT_ALIGNMENT * SLOT_ALIGNMENT
                if prefix:
                    real.append(IoOp(op.file_index, op.offset, buf[:prefix]))
            else:  # bitflip: the bytes on disk differ from the caller's buffer
                copy = buffer_tensor(op.buffer).clone()
                self._flip(copy, where)
                real.append(IoOp(op.file_index, op.offset, copy))
        self.inner.pwrite_blocks(real)
        if failure is not None:
            raise failure

    def pread_blocks(self, ops: Sequence[IoOp]) -> list[OSError | None]:
        """Read through the inner backend with faults applied per block."""
        plan = [self._draw(_READ_KINDS) for _ in ops]
        todo = [i for i, (kind, _) in enumerate(plan) if kind != "eio"]
        inner_results = self.inner.pread_blocks([ops[i] for i in todo])
        results: list[OSError | None] = [None] * len(ops)
        for i, (kind, _) in enumerate(plan):
            if kind == "eio":
                results[i] = OSError(errno.EIO, f"injected eio (file {ops[i].file_index} offset {ops[i].offset})")
        for i, res in zip(todo, inner_results, strict=True):
            results[i] = res
            kind, where = plan[i]
            if kind == "bitflip" and res is None:
                self._flip(buffer_tensor(ops[i].buffer), where)
        return results
