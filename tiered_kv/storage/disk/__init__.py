"""The NVMe disk tier's storage engine: block bytes in preallocated files, an LMDB registry, crash safety.

:class:`DiskStore` is the engine (no eviction policy, no pool bookkeeping: the block pool above decides which
slots to use and which blocks to drop). Backends implement :class:`DiskBackend`: ``posix`` (thread-pool
``pwrite``/``pread``, O_DIRECT where possible) and ``kvikio`` (GPU tensors to files through kvikio/GDS).
:class:`FaultInjectingBackend` wraps any backend to inject EIO, ENOSPC, torn writes and flipped bytes.
"""

from __future__ import annotations

from ._kvikio import kvikio_unavailable_reason
from ._posix import PosixBackend, probe_direct_io
from .backend import SLOT_ALIGNMENT, DiskBackend, IoOp
from .faults import FAULT_KINDS, FaultInjectingBackend
from .store import FORMAT_VERSION, DiskStore, Entry, read_tier_meta
from .wrappers import GatedBackend, WrapperBackend

__all__ = [
    "FAULT_KINDS",
    "FORMAT_VERSION",
    "SLOT_ALIGNMENT",
    "DiskBackend",
    "DiskStore",
    "Entry",
    "FaultInjectingBackend",
    "GatedBackend",
    "IoOp",
    "PosixBackend",
    "WrapperBackend",
    "kvikio_unavailable_reason",
    "probe_direct_io",
    "read_tier_meta",
]
