"""The NVMe disk tier's storage engine: block bytes in preallocated files, an LMDB registry, crash safety.

:class:`DiskStore` is the engine (no eviction policy, no pool bookkeeping: the block pool above decides which
slots to use and which blocks to drop). Backends implement :class:`DiskBackend`: ``posix`` (thread-pool
``pwrite``/``pread``, O_DIRECT where possible) and ``kvikio`` (GPU tensors to files through kvikio/GDS).
:class:`FaultInjectingBackend` wraps any backend to inject EIO, ENOSPC, torn writes and flipped bytes.

Tools that inspect a tier without knowing its model (the ``tiered-kv disk`` commands) start from
:func:`read_tier_meta` (read-only, no writer lock, format version checked), then open a read-only
:class:`DiskStore` with what the meta record names. :func:`find_orphans` finds the blocks whose chain is broken.

Not to be confused with :class:`tiered_kv.storage.disk_tier.DiskBlockStorage`, the adapter that puts a
:class:`DiskStore` behind a block pool (staging of mutable blocks, the pool's storage interface).
"""

from __future__ import annotations

from ._kvikio import kvikio_unavailable_reason
from ._posix import PosixBackend, probe_direct_io
from .backend import SLOT_ALIGNMENT, DiskBackend, IoOp
from .faults import FAULT_KINDS, FaultInjectingBackend
from .registry import FORMAT_VERSION, READABLE_FORMAT_VERSIONS, Row, check_format_version, read_tier_meta
from .store import DiskStore, Entry, VerifyReport, find_orphans
from .wrappers import GatedBackend, WrapperBackend

__all__ = [
    "FAULT_KINDS",
    "FORMAT_VERSION",
    "READABLE_FORMAT_VERSIONS",
    "SLOT_ALIGNMENT",
    "DiskBackend",
    "DiskStore",
    "Entry",
    "FaultInjectingBackend",
    "GatedBackend",
    "IoOp",
    "PosixBackend",
    "WrapperBackend",
    "Row",
    "VerifyReport",
    "check_format_version",
    "find_orphans",
    "kvikio_unavailable_reason",
    "probe_direct_io",
    "read_tier_meta",
]
