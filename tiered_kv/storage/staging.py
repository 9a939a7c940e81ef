"""StagingPool: reused, 4 KiB-aligned (pinned under CUDA) host buffers of one block each.

Bytes that cannot go straight from their slot to the file (a disk block being filled, a snapshot of a victim queued
toward the disk) wait in these buffers. They are aligned so that O_DIRECT writes them in place (no bounce copy), and
reused so that a steady stream of demotions allocates nothing. Buffers given back beyond ``max_bytes`` are freed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import numpy as np
import torch

from ..config import ModelConfig

__all__ = ["StagingPool"]

_ALIGN = 4096


class StagingPool:
    """Block-sized host buffers, handed out and given back.

    Args:
        model: block geometry and dtype.
        pinned: page-locked memory (CUDA present), so copies to and from the GPU are DMA.
        max_bytes: spare buffers kept for reuse; more are freed when given back.
    """

    def __init__(self, model: ModelConfig, *, pinned: bool = False, max_bytes: int = 256 << 20) -> None:
        self.model = model
        self.pinned = pinned
        self._spare: list[torch.Tensor] = []
        self._max = max(1, max_bytes // model.block_size_bytes)
        self._warm = 0
        self._lock = threading.Lock()

    def _new(self, n: int, touch: bool = False) -> list[torch.Tensor]:
        shape, dtype = self.model.block_shape, self.model.torch_dtype
        if self.pinned:
            batch = torch.empty((n, *shape), dtype=dtype, pin_memory=True)  # pinned pages are resident already
        else:
            nbytes = n * self.model.block_size_bytes
            raw = np.empty(nbytes + _ALIGN, dtype=np.uint8)
            if touch:
                raw.fill(0)  # fault the pages in now, not during the copy that will fill them
            start = (-raw.ctypes.data) % _ALIGN
            batch = torch.from_numpy(raw[start : start + nbytes]).view(dtype).reshape(n, *shape)
        return list(batch)

    def spare_count(self) -> int:
        """Buffers allocated and free to take."""
        with self._lock:
            return len(self._spare)

    def keep_warm(self, nbytes: int) -> None:
        """Keep about ``nbytes`` of spare buffers allocated and faulted in (at most the retained maximum), so that
        a burst of snapshots copies into resident memory; fills them now. :meth:`refill` tops them up."""
        self._warm = min(self._max, max(0, nbytes // self.model.block_size_bytes))
        self.refill()

    def refill(self) -> int:
        """Allocate (and fault in) spares up to the warm size; returns how many were added. For a background
        thread (the disk writers call it after each write): the copying threads then find resident buffers."""
        with self._lock:
            missing = self._warm - len(self._spare)
        if missing <= 0:
            return 0
        fresh = self._new(missing, touch=True)
        with self._lock:
            kept = fresh[: max(0, self._max - len(self._spare))]  # buffers given back meanwhile may fill it
            self._spare.extend(kept)
        return len(kept)

    def take(self, n: int) -> list[torch.Tensor]:
        """``n`` buffers (uninitialised: a reused buffer holds an older block's bytes)."""
        with self._lock:
            k = min(n, len(self._spare))
            out = self._spare[len(self._spare) - k :]
            del self._spare[len(self._spare) - k :]
        if k < n:
            out.extend(self._new(n - k))
        return out

    def give(self, buffers: Iterable[torch.Tensor]) -> None:
        """Return buffers that :meth:`take` handed out (nobody may use them afterwards)."""
        with self._lock:
            for b in buffers:
                if len(self._spare) >= self._max:
                    break
                self._spare.append(b)
