"""The one path that moves block bytes between tiers.

Every copy between pools (promotion on match, demotion on eviction, explicit swaps) goes through
:func:`copy_between`: one gather on the source storage and one scatter on the destination per call, whatever the
number of blocks. With CUDA, device<->host copies are issued on a dedicated stream and synchronised with an
event before the destination block is registered, so a block is never matchable before its bytes have landed.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from .blocks import ImmutableBlock, MutableBlock
from .errors import InvalidBlockError
from .pool import BlockPool
from .storage.memory import TensorArena, copy_arena_slots

__all__ = ["copy_between", "TransferStreams"]


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
    src_pool: BlockPool,
    src: Sequence[ImmutableBlock | MutableBlock],
    dst_pool: BlockPool,
    dst: Sequence[MutableBlock],
    streams: TransferStreams | None = None,
) -> list[int]:
    """Copy the bytes of ``src`` blocks into ``dst`` blocks, one gather and one scatter.

    Returns:
        Indices of source blocks whose data failed verification (disk checksum); their destination blocks hold
        garbage and must not be registered. The source pool has already dropped them.
    """
    if len(src) != len(dst):
        raise ValueError(f"src and dst differ in length: {len(src)} != {len(dst)}")
    if not src:
        return []
    stream = streams.stream() if streams is not None else None
    direct = isinstance(getattr(src_pool, "storage", None), TensorArena) and isinstance(dst_pool.storage, TensorArena)
    if direct:
        # Arena to arena: no gather tensor, one copy per run of consecutive slots (DMA from pinned memory).
        for i, b in enumerate(dst):
            if type(b) is not MutableBlock or b.released or b.pool is not dst_pool:
                raise InvalidBlockError(f"dst[{i}]: {b!r} is not a live MutableBlock of the {dst_pool.tier} pool")
        for i, s in enumerate(src):
            if s.released or s.pool is not src_pool:
                raise InvalidBlockError(f"src[{i}]: {s!r} is released or from another pool")
        for b in dst:
            b._written = True  # what scatter records on the other path
        src_arena, dst_arena = src_pool.storage, dst_pool.storage
        assert isinstance(src_arena, TensorArena) and isinstance(dst_arena, TensorArena)
        if stream is None:
            copy_arena_slots(src_arena, [b.block_id for b in src], dst_arena, [b.block_id for b in dst])
            return []
        with torch.cuda.stream(stream):
            copy_arena_slots(src_arena, [b.block_id for b in src], dst_arena, [b.block_id for b in dst])
            event = torch.cuda.Event()
            event.record(stream)
        event.synchronize()
        return []
    # A storage that can read straight into GPU memory (the disk tier through kvikio/GDS) gets a CUDA buffer.
    out = None
    if dst_pool.storage.device.type == "cuda" and getattr(getattr(src_pool, "storage", None), "accepts_cuda", False):
        out = torch.empty((len(src), *dst_pool.model.block_shape), dtype=dst_pool.model.torch_dtype,
                          device=dst_pool.storage.device)
    if stream is None:
        data, bad = src_pool.gather(src, out)
        dst_pool.scatter(dst, data)
        return bad
    with torch.cuda.stream(stream):
        data, bad = src_pool.gather(src, out)
        dst_pool.scatter(dst, data)
        event = torch.cuda.Event()
        event.record(stream)
    event.synchronize()
    return bad
