"""The disk tier as a pool's :class:`~tiered_kv.storage.base.BlockStorage`: a :class:`DiskStore` plus staging.

A mutable block of the disk pool has no bytes on disk yet: it is staged in host memory (filled through
``layer_view`` or by a demotion's scatter) and written, together with every other block of the same
``register_blocks`` call, by one ``DiskStore.write_blocks`` (data first, then one registry commit). Reads go
through ``DiskStore.read_blocks``, which verifies every block's checksum and drops the ones that fail.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from ..config import KvBlockManagerConfig
from ..errors import CorruptBlockError, DiskTierError
from .base import BlockStorage
from .disk import DiskStore
from .disk.backend import DiskBackend

__all__ = ["DiskStorage", "open_disk_storage"]


class DiskStorage(BlockStorage):
    """Block storage of the disk tier.

    Args:
        store: the opened (writable) disk store.
    """

    persistent = True

    def __init__(self, store: DiskStore) -> None:
        self.tier = "disk"
        self.store = store
        self.model = store.model
        self.num_blocks = store.capacity
        self.device = torch.device("cpu")
        self._stage: dict[int, torch.Tensor] = {}
        self._stage_lock = threading.Lock()

    # -- staging of mutable blocks ------------------------------------------------------------------------------
    def _staged(self, slot: int) -> torch.Tensor:
        with self._stage_lock:
            t = self._stage.get(slot)
            if t is None:
                t = self._stage[slot] = torch.zeros(self.model.block_shape, dtype=self.model.torch_dtype)
            return t

    def mutable_view(self, slot: int, layer: int, outer: int) -> torch.Tensor:
        return self._staged(slot)[layer, outer]

    def scatter(self, slots: Sequence[int], data: torch.Tensor) -> None:
        self.check_batch(len(slots), data)
        host = data.to("cpu")
        with self._stage_lock:
            for i, slot in enumerate(slots):
                self._stage[slot] = host[i]

    def drop_stage(self, slot: int) -> None:
        with self._stage_lock:
            self._stage.pop(slot, None)

    def commit(
        self, slots: Sequence[int], hashes: Sequence[bytes], tokens: Sequence[bytes | None] | None = None
    ) -> None:
        # Crash ordering is DiskStore.write_blocks': all data of the batch, then one registry commit.
        with self._stage_lock:
            staged = [self._stage.get(s) for s in slots]
        zeros = None
        parts = []
        for t in staged:
            if t is None:  # registered without being written: its bytes are zeros, as in a memory tier
                if zeros is None:
                    zeros = torch.zeros(self.model.block_shape, dtype=self.model.torch_dtype)
                t = zeros
            parts.append(t)
        # Per-block tensors, not a stacked copy: staged blocks are written from where they lie.
        self.store.write_blocks(list(hashes), list(slots), [p.contiguous() for p in parts], tokens)
        with self._stage_lock:
            for s in slots:
                self._stage.pop(s, None)

    @property
    def accepts_cuda(self) -> bool:
        """Whether reads can land straight in GPU memory (the kvikio backend)."""
        return bool(getattr(self.store.backend, "accepts_cuda", False))

    # -- reads ----------------------------------------------------------------------------------------------------
    def read_view(self, slot: int, layer: int, outer: int) -> torch.Tensor:
        data, bad = self.gather([slot])
        if bad:
            raise CorruptBlockError(f"disk block in slot {slot} failed verification")
        return data[0, layer, outer].clone()

    def gather(self, slots: Sequence[int], out: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int]]:
        try:
            data, bad = self.store.read_blocks(list(slots), out)
        except DiskTierError:
            # A slot lost its row under us (another reader found it corrupt): read one by one, mark the lost.
            data = out if out is not None else torch.empty(
                (len(slots), *self.model.block_shape), dtype=self.model.torch_dtype
            )
            bad = []
            for i, s in enumerate(slots):
                try:
                    one, b = self.store.read_blocks([s])
                except DiskTierError:
                    bad.append(i)
                    continue
                if b:
                    bad.append(i)
                else:
                    data[i].copy_(one[0])
        return data, bad

    # -- registry -------------------------------------------------------------------------------------------------
    def discard(self, slots: Sequence[int], hashes: Sequence[bytes]) -> None:
        # DiskStore.delete commits before it returns: only then does the pool reuse the slots.
        self.store.delete(list(hashes))

    def touch(self, hashes: Sequence[bytes]) -> None:
        """Record hits (last access time, hit count) on stored blocks."""
        self.store.touch(list(hashes))

    def stored_slots(self) -> list[tuple[bytes, int, bytes | None]]:
        """``(hash, slot, token ids)`` of every stored block, least recently used first."""
        return self.store.slot_order()

    def stored_hashes(self) -> set[bytes]:
        """Every hash with a live row."""
        return {h for h, _, _ in self.store.slot_order()}

    def compact(self, exclude: Sequence[int]) -> dict[bytes, tuple[int, int]]:
        """Move stored blocks to the lowest slots (see ``DiskStore.compact``); returns their moves."""
        return self.store.compact(exclude)

    def flush(self) -> None:
        """Make every committed block durable."""
        self.store.flush()

    def close(self) -> None:
        self.store.close()


def open_disk_storage(config: KvBlockManagerConfig, backend: DiskBackend | None = None) -> DiskStorage:
    """Open (or create) the disk tier that ``config.disk`` names, for writing."""
    assert config.disk is not None
    store = DiskStore(
        config.disk, config.model, hash_algorithm=config.hash_algorithm, namespace=config.namespace, backend=backend
    )
    return DiskStorage(store)
