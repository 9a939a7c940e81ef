"""Block handles: what a pool hands out.

A :class:`MutableBlock` owns a freshly allocated slot until it is registered or released. An
:class:`ImmutableBlock` is one reference to a registered block; every match returns a new handle, so each holder
releases exactly its own reference. Handles are cheap (``__slots__``, no per-block tensors): the data is reached
through the pool's storage by slot.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from .errors import InvalidBlockError

if TYPE_CHECKING:
    from .pool import BlockPool

__all__ = ["MutableBlock", "ImmutableBlock", "UnreleasedBlockWarning"]


class UnreleasedBlockWarning(ResourceWarning):
    """A block handle was garbage-collected without ``release()``; it was released then."""


class _Block:
    __slots__ = ("__weakref__", "_gen", "_pool", "_released", "block_id")

    _pool: BlockPool
    block_id: int
    _gen: int
    _released: bool

    @property
    def tier(self) -> str:
        """"device", "host" or "disk"."""
        return self._pool.tier

    @property
    def pool(self) -> BlockPool:
        """The pool this block belongs to."""
        return self._pool

    @property
    def released(self) -> bool:
        """Whether this handle has been released (or consumed by registration)."""
        return self._released

    def _check(self, layer: int, outer: int) -> None:
        if self._released:
            raise InvalidBlockError(f"{type(self).__name__} {self.tier}:{self.block_id} has been released")
        model = self._pool.model
        if not (isinstance(layer, int) and 0 <= layer < model.num_layers):
            raise IndexError(f"layer must be in [0, {model.num_layers}), got {layer!r}")
        if not (isinstance(outer, int) and 0 <= outer < model.outer_dim):
            raise IndexError(f"outer must be in [0, {model.outer_dim}), got {outer!r}")

    def __enter__(self) -> _Block:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Give this handle's hold back to the pool; idempotent."""
        if not self._released:
            self._pool._release_one(self)

    def __del__(self) -> None:
        if not self._released:
            try:
                self._pool._release_from_gc(self)
            except Exception:
                return
            warnings.warn(
                f"{type(self).__name__} {self.tier}:{self.block_id} was garbage-collected without release()",
                UnreleasedBlockWarning,
                stacklevel=2,
            )


class MutableBlock(_Block):
    """A freshly allocated block to be filled with KV data and then registered.

    Registering a block whose data was never written raises :class:`~tiered_kv.errors.BlockNotComplete`
    (seed 001). Taking a writable :meth:`layer_view`, :meth:`write`, ``pool.scatter`` and copies into the block
    (``copy_blocks``, promotion, demotion) count as writing it.
    """

    __slots__ = ("_written",)

    def __init__(self, pool: BlockPool, block_id: int, gen: int) -> None:
        self._pool = pool
        self.block_id = block_id
        self._gen = gen
        self._released = False
        self._written = False

    @property
    def written(self) -> bool:
        """Whether the block's data has been written (or a writable view of it handed out)."""
        return self._written

    def layer_view(self, layer: int, outer: int) -> torch.Tensor:
        """Writable ``[page_size, inner_dim]`` tensor of one layer's K (outer=0) or V (outer=1)."""
        self._check(layer, outer)
        self._written = True  # a writable view is taken to be written through
        return self._pool.storage.mutable_view(self.block_id, layer, outer)

    def write(self, layer: int, outer: int, data: torch.Tensor) -> None:
        """Copy ``data`` into one layer's K or V, checking shape and dtype exactly (no broadcasting).

        Raises:
            ValueError: ``data`` is not ``[page_size, inner_dim]`` of the model dtype.
        """
        self._check(layer, outer)
        model = self._pool.model
        shape = (model.page_size, model.inner_dim)
        if not isinstance(data, torch.Tensor) or tuple(data.shape) != shape or data.dtype != model.torch_dtype:
            got = (tuple(data.shape), data.dtype) if isinstance(data, torch.Tensor) else type(data).__name__
            raise ValueError(f"data: expected a tensor of shape {shape} and dtype {model.torch_dtype}, got {got}")
        self._pool.storage.mutable_view(self.block_id, layer, outer).copy_(data)
        self._written = True

    def __repr__(self) -> str:
        state = "released" if self._released else "mutable"
        return f"MutableBlock({self.tier}:{self.block_id}, {state})"


class ImmutableBlock(_Block):
    """One reference to a registered block; shared data, never written through this handle."""

    __slots__ = ("sequence_hash",)

    sequence_hash: bytes

    def __init__(self, pool: BlockPool, block_id: int, gen: int, sequence_hash: bytes) -> None:
        self._pool = pool
        self.block_id = block_id
        self._gen = gen
        self._released = False
        self.sequence_hash = sequence_hash

    def layer_view(self, layer: int, outer: int) -> torch.Tensor:
        """``[page_size, inner_dim]`` copy of one layer's K or V (disk: read and checksum-verified)."""
        self._check(layer, outer)
        return self._pool._read_view(self, layer, outer)

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"ImmutableBlock({self.tier}:{self.block_id}, {self.sequence_hash.hex()[:16]}, {state})"
