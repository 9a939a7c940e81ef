"""The copy primitives that move block bytes between tiers; only the offload scheduler calls them.

* :func:`copy_between` copies held blocks (promotion on match, swaps, ``copy_blocks``, cleaning, writeback), through
  :meth:`OffloadScheduler.copy <tiered_kv.offload.OffloadScheduler.copy>`;
* :func:`copy_slots` and :func:`snapshot_slots` copy victims out of their slots inside an eviction handler (under
  the evicting pool's lock, before the slots are reused): into the next memory tier, or into staging buffers queued
  toward the disk.

Each picks the path with the fewest copies that the two storages' capability flags allow (one ``copy_`` per run of
arena slots, disk reads straight into arena slots, disk writes straight from arena slots or snapshots). With CUDA,
copies are issued on a dedicated stream and synchronised with an event before the destination block is registered,
so a block is never matchable before its bytes have landed.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch

from .blocks import ImmutableBlock, MutableBlock
from .errors import InvalidBlockError
from .pool import BlockPool
from .storage.base import BlockStorage
from .storage.memory import TensorArena, copy_arena_slots
from .storage.staging import StagingPool

__all__ = ["copy_between", "copy_slots", "snapshot_slots", "TransferStreams"]


class TransferStreams:
    """A dedicated CUDA stream per thread for tier copies (absent on CPU-only machines)."""

    def __init__(self, device_type: str) -> None:
        self.enabled = device_type == "cuda" and torch.cuda.is_available()
        self._local = threading.local()

    def stream(self) -> torch.cuda.Stream | None:
        """This thread's copy stream, created on first use."""
        if not self.enabled:
            return None
        s = getattr(self._local, "stream", None)
        if s is None:
            s = self._local.stream = torch.cuda.Stream()
        return s


def copy_between(
    src_pool: BlockPool | Any,
    src: Sequence[ImmutableBlock | MutableBlock | Any],
    dst_pool: BlockPool,
    dst: Sequence[MutableBlock],
    streams: TransferStreams | None = None,
    *,
    borrow: bool = False,
) -> list[int]:
    """Copy the bytes of ``src`` blocks into ``dst`` blocks by the shortest path the storages allow.

    Paths, picked from the storages' capability flags:

    * arena -> arena: one ``copy_`` per run of consecutive slots (DMA from pinned memory under CUDA);
    * disk -> arena with direct slots: each block is read (and verified) straight into its destination slot;
    * arena or snapshot -> disk: the block is staged as a view of its slot / snapshot (``borrow=True``: the caller
      keeps the source held until the destination is registered) or copied once into aligned staging, then
      written from there by the registration;
    * snapshot -> arena: one copy per block into its slot;
    * otherwise one gather and one scatter.

    Args:
        src_pool: a pool, or a snapshot source (blocks carrying their bytes, see ``tiered_kv.sources``).
        borrow: see above (the scheduler's movers, which hold their sources until registration).

    Returns:
        Indices of source blocks whose data failed verification (disk checksum); their destination blocks hold
        garbage and must not be registered. The source pool has already dropped them.
    """
    if len(src) != len(dst):
        raise ValueError(f"src and dst differ in length: {len(src)} != {len(dst)}")
    if not src:
        return []
    for i, b in enumerate(dst):
        if type(b) is not MutableBlock or b.released or b.pool is not dst_pool:
            raise InvalidBlockError(f"dst[{i}]: {b!r} is not a live MutableBlock of the {dst_pool.tier} pool")
        b._written = True  # what scatter records on the gather/scatter path
    for i, sb in enumerate(src):
        if sb.released or (isinstance(src_pool, BlockPool) and sb.pool is not src_pool):
            raise InvalidBlockError(f"src[{i}]: {sb!r} is released or from another pool")
    stream = streams.stream() if streams is not None else None
    if stream is None:
        return _copy(src_pool, src, dst_pool, dst, borrow)
    with torch.cuda.stream(stream):
        bad = _copy(src_pool, src, dst_pool, dst, borrow)
        event = torch.cuda.Event()
        event.record(stream)
    event.synchronize()
    return bad


def _copy(
    src_pool: Any, src: Sequence[Any], dst_pool: BlockPool, dst: Sequence[MutableBlock], borrow: bool
) -> list[int]:
    dst_store = dst_pool.storage
    snapshots = not isinstance(src_pool, BlockPool)
    src_store = None if snapshots else src_pool.storage
    if isinstance(src_store, TensorArena) and isinstance(dst_store, TensorArena):
        copy_arena_slots(src_store, [b.block_id for b in src], dst_store, [b.block_id for b in dst])
        return []
    if dst_store.persistent:
        if snapshots:
            views = [b.data for b in src]
        elif src_store is not None and src_store.direct_slots:
            views = [src_store.slot_view(b.block_id) for b in src]
        else:
            views = None
        if views is not None:
            dst_pool.stage_views(dst, views, borrow=borrow)
            return []
    reads_here = dst_store.device.type == "cpu" or (src_store is not None and src_store.accepts_cuda)
    if dst_store.direct_slots and reads_here:
        if snapshots:
            non_blocking = dst_store.device.type == "cuda"
            for b, s in zip(dst, src):
                dst_store.slot_view(b.block_id).copy_(s.data, non_blocking=non_blocking)
            return []
        if src_store is not None and src_store.persistent:
            if src_store.reads_into_rows and dst_store.has_byte_rows:  # host memory: no tensor view per block
                return src_pool.read_into(src, dst_store.byte_rows([b.block_id for b in dst]))
            return src_pool.read_into(src, [dst_store.slot_view(b.block_id) for b in dst])
    # A storage that can read straight into GPU memory (the disk tier through kvikio/GDS) gets a CUDA buffer.
    out = None
    if dst_store.device.type == "cuda" and src_store is not None and src_store.accepts_cuda:
        out = torch.empty((len(src), *dst_pool.model.block_shape), dtype=dst_pool.model.torch_dtype,
                          device=dst_store.device)
    data, bad = src_pool.gather(src, out)
    dst_pool.scatter(dst, data)
    return bad


def copy_slots(src: BlockStorage, slots: Sequence[int], dst_pool: BlockPool, dst: Sequence[MutableBlock]) -> None:
    """Copy victims' bytes (slots just evicted from ``src``, still intact under its pool's lock) into ``dst``."""
    for b in dst:
        b._written = True
    dst_store = dst_pool.storage
    if isinstance(src, TensorArena) and isinstance(dst_store, TensorArena):
        copy_arena_slots(src, slots, dst_store, [b.block_id for b in dst])
        return
    if src.direct_slots and dst_store.persistent:
        dst_pool.stage_views(dst, [src.slot_view(s) for s in slots], borrow=False)
        return
    data, _ = src.gather(slots)
    dst_pool.scatter(dst, data)


def snapshot_slots(src: BlockStorage, slots: Sequence[int], staging: StagingPool) -> list[torch.Tensor]:
    """Copy slots into host staging buffers (one copy each), e.g. victims queued toward the disk tier."""
    bufs = staging.take(len(slots))
    non_blocking = src.device.type == "cuda" and staging.pinned
    if src.direct_slots:
        for b, s in zip(bufs, slots):
            b.copy_(src.slot_view(s), non_blocking=non_blocking)
    else:
        data, _ = src.gather(slots)
        for i, b in enumerate(bufs):
            b.copy_(data[i])
    if non_blocking:
        torch.cuda.current_stream(src.device).synchronize()
    return bufs
