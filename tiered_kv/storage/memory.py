"""Tensor arenas for the device and host tiers.

One preallocated arena per tier. ``fully_contiguous`` is a single tensor ``[blocks, layers, outer, page, inner]``
(one block is one contiguous range of bytes, so a block moves with one copy); ``layer_separate`` is one tensor
``[blocks, outer, page, inner]`` per layer (the shape attention kernels that index per layer want). Gather and
scatter move many blocks per call with ``index_select`` / ``index_copy_`` on whole tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..config import ModelConfig
from .base import BlockStorage

__all__ = ["TensorArena"]


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
            self._whole: torch.Tensor | None = torch.zeros(
                (num_blocks, L, O, P, I), dtype=dtype, device=self.device, pin_memory=pin_memory
            )
            self._layers = [self._whole[:, layer] for layer in range(L)]
        else:
            self._whole = None
            self._layers = [
                torch.zeros((num_blocks, O, P, I), dtype=dtype, device=self.device, pin_memory=pin_memory)
                for _ in range(L)
            ]

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

    def _index(self, slots: Sequence[int]) -> torch.Tensor:
        return torch.as_tensor(list(slots), dtype=torch.long, device=self.device)

    def gather(self, slots: Sequence[int], out: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int]]:
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

    def scatter(self, slots: Sequence[int], data: torch.Tensor) -> None:
        self.check_batch(len(slots), data)
        idx = self._index(slots)
        if data.device != self.device:
            data = data.to(self.device, non_blocking=self.pinned or data.is_pinned())
        if self._whole is not None:
            self._whole.index_copy_(0, idx, data)
        else:
            for layer, t in enumerate(self._layers):
                t.index_copy_(0, idx, data[:, layer])


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
    non_blocking = src.device.type != dst.device.type and (src.pinned or dst.pinned)
    pairs = [(src._whole, dst._whole)] if src._whole is not None and dst._whole is not None else None
    for s0, d0, n in _runs(src_slots, dst_slots):
        if pairs is not None:
            for a, b in pairs:
                b[d0 : d0 + n].copy_(a[s0 : s0 + n], non_blocking=non_blocking)
        else:
            for a, b in zip(src._layers, dst._layers):
                b[d0 : d0 + n].copy_(a[s0 : s0 + n], non_blocking=non_blocking)
