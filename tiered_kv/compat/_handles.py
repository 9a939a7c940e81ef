"""Integer block ids for the seed facades: the references a facade holds on a tier's blocks, by slot.

The seeds' APIs pass blocks around as integer ids (``free_blocks(block_ids)``), where the engine passes handles
that each own one reference. A :class:`HandleTable` keeps the handles a facade took on its caller's behalf, keyed
by block id, so that each id-based call maps onto the engine call for the matching handles.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch

from ..blocks import ImmutableBlock, MutableBlock
from ..errors import InvalidBlockError
from ..pool import BlockPool, BlockState

if TYPE_CHECKING:
    from ..manager import KvBlockManager

__all__ = ["Block", "HandleTable"]

Handle = MutableBlock | ImmutableBlock


class Block:
    """A block of a facade's tier, by integer id (``Block`` of the BlockPoolManager API, ``CacheBlock`` of the
    PrefixCacheManager API).

    A view, not a reference: what it reports is read from the pool when asked.
    """

    __slots__ = ("_table", "block_id")

    def __init__(self, table: HandleTable, block_id: int) -> None:
        self._table = table
        self.block_id = block_id

    @property
    def block_hash(self) -> bytes | None:
        """The hash the block is cached under, or None while it is not cached."""
        return self._table.pool.hash_of(self.block_id)

    @property
    def state(self) -> BlockState:
        """FREE, ALLOCATED, CACHED or PINNED (in priority order: PINNED > CACHED > ALLOCATED > FREE)."""
        return self._table.pool.block_state(self.block_id)

    @property
    def ref_cnt(self) -> int:
        """References held on this block through the facade."""
        return self._table.count(self.block_id)

    @property
    def is_cached(self) -> bool:
        """Whether the block is registered (matchable)."""
        return self.block_hash is not None

    def layer_view(self, layer: int, outer: int) -> torch.Tensor:
        """One layer's K (outer=0) or V (outer=1) through a held reference: writable while not yet cached."""
        return self._table.handle(self.block_id).layer_view(layer, outer)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Block) and other._table is self._table and other.block_id == self.block_id

    def __hash__(self) -> int:
        return hash((id(self._table), self.block_id))

    def __repr__(self) -> str:
        h = self.block_hash
        return f"Block({self.block_id}, {h.hex()[:16] if h else None}, {self.state.name})"


class HandleTable:
    """The handles a facade holds, by block id, for one pool. Thread-safe."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self._held: dict[int, list[Handle]] = {}
        self._lock = threading.Lock()

    def block(self, block_id: int) -> Block:
        """The :class:`Block` view of an id."""
        return Block(self, block_id)

    def add(self, handles: Iterable[Handle]) -> list[Block]:
        """Hold ``handles``; returns their views."""
        out = []
        with self._lock:
            for h in handles:
                self._held.setdefault(h.block_id, []).append(h)
                out.append(Block(self, h.block_id))
        return out

    def count(self, block_id: int) -> int:
        """References held on ``block_id``."""
        with self._lock:
            return len(self._held.get(block_id, ()))

    def handle(self, block_id: int) -> Handle:
        """One held handle of ``block_id`` (the mutable one while the block is being filled)."""
        with self._lock:
            held = self._held.get(block_id)
            if not held:
                raise InvalidBlockError(f"block {block_id} is not held (allocate, look up and touch, or match it)")
            return held[0]

    def take_mutable(self, block_ids: Sequence[int], argument: str = "block_ids") -> list[MutableBlock]:
        """Remove and return the mutable handle of each id (for registration)."""
        with self._lock:
            out: list[MutableBlock] = []
            for i, bid in enumerate(block_ids):
                held = self._held.get(bid, [])
                mut = next((h for h in held if isinstance(h, MutableBlock) and h not in out), None)
                if mut is None:
                    raise InvalidBlockError(f"{argument}[{i}]: block {bid!r} is not an allocated, uncached block")
                out.append(mut)
            for mut in out:
                self._remove(mut)
            return out

    def pop(self, block_ids: Sequence[int], argument: str = "block_ids") -> list[Handle]:
        """Remove one held handle per id (an id listed twice gives two); all or nothing."""
        with self._lock:
            taken: list[Handle] = []
            try:
                for i, bid in enumerate(block_ids):
                    held = self._held.get(bid)
                    if not held:
                        raise InvalidBlockError(f"{argument}[{i}]: block {bid!r} is not held by this manager")
                    # Cached references go first, so that the mutable handle of a block being filled stays.
                    h = next((x for x in reversed(held) if isinstance(x, ImmutableBlock)), held[-1])
                    self._remove(h)
                    taken.append(h)
            except BaseException:
                for h in taken:
                    self._held.setdefault(h.block_id, []).append(h)
                raise
            return taken

    def drain(self) -> list[Handle]:
        """Remove and return every held handle."""
        with self._lock:
            out = [h for held in self._held.values() for h in held]
            self._held.clear()
            return out

    def close(self, manager: KvBlockManager, *, owns_manager: bool) -> None:
        """A facade's ``close``: release every held handle (while the manager is open), then close the manager if
        the facade created it. Idempotent."""
        handles = self.drain()
        if not manager.closed:
            self.pool.release_blocks(handles)
        if owns_manager:
            manager.close()

    def held_ids(self) -> list[int]:
        """Ids with at least one held reference."""
        with self._lock:
            return list(self._held)

    def _remove(self, handle: Handle) -> None:
        held = self._held[handle.block_id]
        held.remove(handle)
        if not held:
            del self._held[handle.block_id]
