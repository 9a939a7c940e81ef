"""Tensor arenas for the device and host tiers.

One preallocated arena per tier. ``fully_contiguous`` is a single tensor ``[blocks, layers, outer, page, inner]``
(one block is one contiguous range of bytes, so a block moves with one copy); ``layer_separate`` is one tensor
``[blocks, outer, page, inner]`` per layer (the shape attention kernels that index per layer want). Gather and
scatter move many blocks per call: one ``copy_`` per run of consecutive slots on the CPU, batched index kernels on
CUDA when the slots are scattered.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..config import ModelConfig
from .base import BlockStorage

__all__ = ["TensorArena"]

_ALIGN = 4096  # O_DIRECT's alignment (the disk tier's SLOT_ALIGNMENT)
_SMALL_BLOCK = 64 << 10  # blocks up to this size move by numpy row copies on the CPU (see TensorArena._rows)


class TensorArena(BlockStorage):
    """The preallocated memory of one tier.

    Args:
        tier: "device" or "host".
        model: block geometry.
        num_blocks: slots.
        layout: "fully_contiguous" or "layer_separate".
        device: torch device of the arena.
        pin_memory: allocate in page-locked host memory (host tier with CUDA).
    """

    def __init__(
        self,
        tier: str,
        model: ModelConfig,
        num_blocks: int,
        layout: str,
        device: torch.device | str,
        pin_memory: bool = False,
    ) -> None:
        self.tier = tier
        self.model = model
        self.num_blocks = num_blocks
        self.layout = layout
        self.device = torch.device(device)
        self.pinned = pin_memory
        L, O, P, I = model.block_shape  # noqa: E741
        dtype = model.torch_dtype
        if layout == "fully_contiguous":
            self._whole: torch.Tensor | None = _zeros((num_blocks, L, O, P, I), dtype, self.device, pin_memory)
            self._layers = [self._whole[:, layer] for layer in range(L)]
        else:
            self._whole = None
            self._layers = [_zeros((num_blocks, O, P, I), dtype, self.device, pin_memory) for _ in range(L)]
        # Copy primitive, picked by measurement: on CPU tensors one copy_ per run of consecutive slots runs at
        # memcpy speed while index_copy_/index_select crawl (1.5 vs 18 GB/s for 32 KiB pieces); on CUDA one
        # batched index kernel beats many small launches once slots are scattered.
        self._index_ops = self.device.type == "cuda"
        # Small blocks on the CPU: the fixed cost of a torch call (about 4 us per copy_) dwarfs the bytes, so a
        # batch moves in one numpy fancy-indexing copy over byte rows instead (24 blocks of 512 B: 3 us instead of
        # 93 us; still ahead up to 32 KiB, and behind per-run copy_ from 256 KiB on).
        self._rows: list[np.ndarray] | None = None
        if self.device.type == "cpu" and model.block_size_bytes <= _SMALL_BLOCK:
            tensors = [self._whole] if self._whole is not None else self._layers
            self._rows = [_as_numpy(t).reshape(num_blocks, -1) for t in tensors]
        # fully_contiguous: a slot is one contiguous range of bytes (4 KiB-aligned on the CPU), see slot_view.
        self.direct_slots = self._whole is not None
        # In host memory, the same bytes as numpy rows: the disk tier reads into them without a tensor per block.
        self._bytes: np.ndarray | None = None
        if self._whole is not None and self.device.type == "cpu":
            self._bytes = self._whole.view(torch.uint8).numpy().reshape(num_blocks, -1)
        self.has_byte_rows = self._bytes is not None

    @property
    def nbytes(self) -> int:
        """Bytes held by the arena."""
        return self.num_blocks * self.model.block_size_bytes

    def layer_tensor(self, layer: int) -> torch.Tensor:
        """``[blocks, outer, page, inner]`` view of one layer for every slot (what attention kernels index)."""
        return self._layers[layer]

    def mutable_view(self, slot: int, layer: int, outer: int) -> torch.Tensor:
        return self._layers[layer][slot, outer]

    def read_view(self, slot: int, layer: int, outer: int) -> torch.Tensor:
        # torch has no read-only tensors; a copy keeps shared, registered data immutable.
        return self._layers[layer][slot, outer].clone()

    def slot_view(self, slot: int) -> torch.Tensor:
        """The slot's bytes as one contiguous ``[layers, outer, page, inner]`` tensor (fully_contiguous only).

        Movers read into it and write from it without staging (the disk tier does O_DIRECT I/O straight to and
        from these views); callers must hold the block for as long as they use the view.
        """
        if self._whole is None:
            raise ValueError(f"the {self.tier} arena is layer_separate: a slot is not one contiguous range")
        return self._whole[slot]

    def byte_rows(self, slots: Sequence[int]) -> list[np.ndarray]:
        """Each slot's bytes as a writable 1-D uint8 numpy array (host fully_contiguous arenas), no copy: a
        fraction of a microsecond per slot where :meth:`slot_view` builds a tensor. Callers hold the blocks."""
        rows = self._bytes
        if rows is None:
            raise ValueError(f"the {self.tier} arena has no byte rows (layer_separate, or not in host memory)")
        return [rows[s] for s in slots]

    def _index(self, slots: Sequence[int]) -> torch.Tensor:
        return torch.as_tensor(list(slots), dtype=torch.long, device=self.device)

    def _use_index_ops(self, runs: list[tuple[int, int, int]]) -> bool:
        return self._index_ops and len(runs) > 4

    def _byte_rows(self, data: torch.Tensor) -> np.ndarray | None:
        """``data`` (``[n, layers, ...]``, contiguous, on the CPU) as one row per block matching ``self._rows[0]``
        (a view: writing it writes ``data``), or None."""
        try:
            arr = _as_numpy(data)
        except (TypeError, RuntimeError):  # not on the CPU, or needs grad
            return None
        if not arr.flags.c_contiguous or arr.dtype != self._rows[0].dtype:  # type: ignore[index]
            return None
        rows = arr.reshape(arr.shape[0], -1)
        return rows if rows.shape[1] == self._rows[0].shape[1] else None  # type: ignore[index]

    def gather(self, slots: Sequence[int], out: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int]]:
        n = len(slots)
        if self._rows is not None and self._whole is not None and n:
            if out is None:
                out = torch.empty((n, *self.model.block_shape), dtype=self.model.torch_dtype)
            rows = self._byte_rows(out)
            if rows is not None:
                np.take(self._rows[0], slots, axis=0, out=rows)
                return out, []
        runs = _runs(slots, range(n))
        if self._use_index_ops(runs):
            idx = self._index(slots)
            if self._whole is not None:
                if out is not None and out.device == self.device:
                    torch.index_select(self._whole, 0, idx, out=out)
                    return out, []
                data = self._whole.index_select(0, idx)
            else:
                data = torch.stack([t.index_select(0, idx) for t in self._layers], dim=1)
            if out is not None:
                out.copy_(data)
                return out, []
            return data, []
        if out is None:
            out = torch.empty((n, *self.model.block_shape), dtype=self.model.torch_dtype, device=self.device)
        non_blocking = out.device.type != self.device.type and self.pinned
        for s0, d0, k in runs:
            if self._whole is not None:
                out[d0 : d0 + k].copy_(self._whole[s0 : s0 + k], non_blocking=non_blocking)
            else:
                for layer, t in enumerate(self._layers):
                    out[d0 : d0 + k, layer].copy_(t[s0 : s0 + k], non_blocking=non_blocking)
        return out, []

    def scatter(self, slots: Sequence[int], data: torch.Tensor) -> None:
        self.check_batch(len(slots), data)
        if self._rows is not None and slots:
            if self._whole is not None:
                rows = self._byte_rows(data)
                if rows is not None:
                    self._rows[0][slots] = rows
                    return
            elif data.device.type == "cpu" and not data.requires_grad:
                for layer, dst in enumerate(self._rows):
                    dst[slots] = _as_numpy(data[:, layer].contiguous()).reshape(len(slots), -1)
                return
        runs = _runs(range(len(slots)), slots)
        non_blocking = data.device != self.device and (self.pinned or data.is_pinned())
        if self._use_index_ops(runs):
            idx = self._index(slots)
            if data.device != self.device:
                data = data.to(self.device, non_blocking=non_blocking)
            if self._whole is not None:
                self._whole.index_copy_(0, idx, data)
            else:
                for layer, t in enumerate(self._layers):
                    t.index_copy_(0, idx, data[:, layer])
            return
        for s0, d0, k in runs:
            if self._whole is not None:
                self._whole[d0 : d0 + k].copy_(data[s0 : s0 + k], non_blocking=non_blocking)
            else:
                for layer, t in enumerate(self._layers):
                    t[d0 : d0 + k].copy_(data[s0 : s0 + k, layer], non_blocking=non_blocking)


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's memory as a numpy array (no copy); dtypes numpy lacks (bfloat16, fp8) as same-size ints."""
    try:
        return t.numpy()
    except TypeError:  # e.g. "Got unsupported ScalarType BFloat16"
        return t.view(_SAME_SIZE_INT[t.element_size()]).numpy()


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, pin_memory: bool) -> torch.Tensor:
    """A zeroed arena tensor; on the CPU (unpinned) 4 KiB-aligned, so O_DIRECT can read into its slots in place."""
    if device.type != "cpu" or pin_memory:
        return torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin_memory)  # page-aligned already
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    raw = np.empty(nbytes + _ALIGN, dtype=np.uint8)
    raw.fill(0)  # touch every page now, as torch.zeros does: not on the first copy into a slot
    start = (-raw.ctypes.data) % _ALIGN
    return torch.from_numpy(raw[start : start + nbytes]).view(dtype).reshape(shape)


def _runs(src: Sequence[int], dst: Sequence[int]) -> list[tuple[int, int, int]]:
    """Coalesce slot pairs into ``(src_start, dst_start, length)`` runs of consecutive slots on both sides."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst):
        if runs:
            s0, d0, n = runs[-1]
            if s == s0 + n and d == d0 + n:
                runs[-1] = (s0, d0, n + 1)
                continue
        runs.append((s, d, 1))
    return runs


def copy_arena_slots(src: TensorArena, src_slots: Sequence[int], dst: TensorArena, dst_slots: Sequence[int]) -> None:
    """Copy blocks straight from one arena to another, one copy per run of consecutive slots.

    No staging tensor: between a pinned host arena and a CUDA arena every copy is an asynchronous DMA on the
    current stream (the caller synchronises), which is what makes host<->device copies run at link speed.
    """
    if src._rows is not None and dst._rows is not None and len(src._rows) == len(dst._rows) and src_slots:
        for rows_from, rows_to in zip(src._rows, dst._rows):  # small CPU blocks: one fancy-indexing copy each
            rows_to[list(dst_slots)] = rows_from[list(src_slots)]
        return
    non_blocking = src.device.type != dst.device.type and (src.pinned or dst.pinned)
    pairs = [(src._whole, dst._whole)] if src._whole is not None and dst._whole is not None else None
    for s0, d0, n in _runs(src_slots, dst_slots):
        if pairs is not None:
            for a, b in pairs:
                b[d0 : d0 + n].copy_(a[s0 : s0 + n], non_blocking=non_blocking)
        else:
            for a, b in zip(src._layers, dst._layers):
                b[d0 : d0 + n].copy_(a[s0 : s0 + n], non_blocking=non_blocking)
