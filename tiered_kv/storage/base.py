"""The interface a block pool uses to reach its bytes.

Storage knows slots and bytes, never the eviction order. Which pool lock is held when the pool calls in:

* the pool lock (``BlockPool._lock``): ``discard`` (eviction, invalidation, reset; on the disk tier an LMDB
  transaction deleting registry rows), ``touch`` and ``drop_stage``. The pool's eviction handler runs there too and
  reads the victims' slots (``copy_slots`` / ``snapshot_slots``);
* the register lock of a persistent pool (``BlockPool._register_lock``, taken before the pool lock): ``commit`` of
  a registration (data written, then one registry commit);
* no pool lock: ``gather``, ``read_into``, ``scatter``, ``stage_views`` of blocks the caller holds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch

from ..config import ModelConfig
from .staging import StagingPool

__all__ = ["BlockStorage"]


class BlockStorage(ABC):
    """Bytes of ``num_blocks`` slots, each one block of ``model.block_shape``."""

    tier: str
    model: ModelConfig
    num_blocks: int
    device: torch.device
    # Capability flags: the mover (``tiered_kv.transfer.copy_between``) picks its copy path from these, never by
    # probing for attributes.
    #: Data is only reachable through I/O (the disk tier): mutable blocks are staged; :meth:`read_into` and
    #: :meth:`stage_views` move bytes without an intermediate batch.
    persistent: bool = False
    #: Every slot is one contiguous range of bytes that :meth:`slot_view` returns (a fully_contiguous arena).
    direct_slots: bool = False
    #: :meth:`read_into` may target CUDA memory (the disk tier through kvikio / GPUDirect Storage).
    accepts_cuda: bool = False
    #: :meth:`read_into` also takes one 1-D uint8 numpy array per block (another storage's :meth:`byte_rows`).
    reads_into_rows: bool = False
    #: :meth:`byte_rows` returns each slot's bytes as a numpy row (a fully_contiguous arena in host memory).
    has_byte_rows: bool = False
    #: Reused aligned host buffers for bytes on their way to this storage (persistent storages).
    staging: StagingPool | None = None

    @abstractmethod
    def mutable_view(self, slot: int, layer: int, outer: int) -> torch.Tensor:
        """A writable ``[page_size, inner_dim]`` tensor for a block being filled."""

    @abstractmethod
    def read_view(self, slot: int, layer: int, outer: int) -> torch.Tensor:
        """A ``[page_size, inner_dim]`` tensor with a registered block's data that callers may not write through."""

    @abstractmethod
    def gather(self, slots: Sequence[int], out: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int]]:
        """Copy many blocks out in one call.

        Returns:
            ``([n, layers, outer, page, inner] tensor, indices of blocks that failed verification)``.
        """

    @abstractmethod
    def scatter(self, slots: Sequence[int], data: torch.Tensor) -> None:
        """Copy ``data`` (``[n, layers, outer, page, inner]``) into many slots in one call."""

    def slot_view(self, slot: int) -> torch.Tensor:
        """The slot's bytes as one contiguous ``[layers, outer, page, inner]`` tensor (when ``direct_slots``)."""
        raise NotImplementedError(f"the {self.tier} storage has no direct slot views")

    def byte_rows(self, slots: Sequence[int]) -> list[np.ndarray]:
        """Each slot's bytes as a writable 1-D uint8 numpy array, no copy (when ``has_byte_rows``)."""
        raise NotImplementedError(f"the {self.tier} storage has no byte rows")

    def read_into(
        self, slots: Sequence[int], out: torch.Tensor | Sequence[torch.Tensor] | Sequence[np.ndarray]
    ) -> list[int]:
        """Read slots straight into ``out`` (one contiguous block tensor each); returns failed indices."""
        raise NotImplementedError(f"the {self.tier} storage does not read by I/O")

    def stage_views(self, slots: Sequence[int], views: Sequence[torch.Tensor], *, borrow: bool = True) -> None:
        """Stage block tensors for the next commit (persistent storages)."""
        raise NotImplementedError(f"the {self.tier} storage does not stage blocks")

    def check_batch(self, n: int, data: torch.Tensor) -> None:
        """Refuse data that is not ``[n, layers, outer, page, inner]`` of the model dtype (no broadcasting)."""
        expected = (n, *self.model.block_shape)
        if tuple(data.shape) != expected or data.dtype != self.model.torch_dtype:
            raise ValueError(
                f"data: expected shape {expected} and dtype {self.model.torch_dtype}, "
                f"got {tuple(data.shape)} and {data.dtype}"
            )

    def commit(  # noqa: B027 - optional hook
        self,
        slots: Sequence[int],
        hashes: Sequence[bytes],
        tokens: Sequence[bytes | None] | None = None,
        parents: Sequence[bytes | None] | None = None,
    ) -> None:
        """Make freshly registered blocks durable (disk, with their token ids and parents); memory tiers have
        nothing to do."""

    def discard(self, slots: Sequence[int], hashes: Sequence[bytes]) -> None:  # noqa: B027 - optional hook
        """Forget registered blocks before their slots are reused (disk: delete their registry rows)."""

    def touch(self, hashes: Sequence[bytes]) -> None:  # noqa: B027 - optional hook
        """Record hits on registered blocks (disk: last access time and hit count in the registry)."""

    def drop_stage(self, slot: int) -> None:  # noqa: B027 - optional hook
        """A mutable block was freed without being registered."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release files and memory."""
