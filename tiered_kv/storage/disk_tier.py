"""The disk tier as a pool's :class:`~tiered_kv.storage.base.BlockStorage`: a :class:`DiskStore` plus staging.

Two classes, two roles: :class:`~tiered_kv.storage.disk.DiskStore` is the storage engine (files, registry, crash
ordering; knows nothing of pools), and :class:`DiskBlockStorage` here is the adapter that puts one behind a block
pool (``DiskStorage`` is its old name, kept as an alias).

A mutable block of the disk pool has no bytes on disk yet: it is staged in host memory (filled through
``layer_view`` or by a demotion's scatter) and written, together with every other block of the same
``register_blocks`` call, by one ``DiskStore.write_blocks`` (data first, then one registry commit). Reads go
through ``DiskStore.read_blocks``, which verifies every block's checksum and drops the ones that fail.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..config import KvBlockManagerConfig
from ..errors import CorruptBlockError, DiskTierError
from .base import BlockStorage
from .disk import DiskStore
from .disk.backend import DiskBackend
from .staging import StagingPool

__all__ = ["DiskBlockStorage", "DiskStorage", "open_disk_storage"]


class DiskBlockStorage(BlockStorage):
    """Block storage of the disk tier: the pool-facing adapter over a :class:`DiskStore`.

    Args:
        store: the opened (writable) disk store.
    """

    persistent = True
    staging: StagingPool

    def __init__(self, store: DiskStore, *, pinned: bool = False) -> None:
        self.tier = "disk"
        self.store = store
        self.model = store.model
        self.num_blocks = store.capacity
        self.device = torch.device("cpu")
        self.staging = StagingPool(self.model, pinned=pinned)
        self.accepts_cuda = bool(store.backend.accepts_cuda)  # reads land straight in GPU memory (kvikio)
        self.reads_into_rows = True  # DiskStore.read_into takes numpy rows (as tensors for a tensor-only backend)
        # slot -> (bytes to write, owned): owned buffers come from the staging pool and go back to it; borrowed
        # ones are views the mover guarantees stay intact until the block is registered (see stage_views).
        self._stage: dict[int, tuple[torch.Tensor, bool]] = {}
        self._written: dict[int, int] = {}  # slot -> checksum of bytes scatter already wrote there
        self._stage_lock = threading.Lock()

    # -- staging of mutable blocks ------------------------------------------------------------------------------
    # A mutable disk block's bytes are in one of three places until it is registered: already in its slot on disk
    # (written by scatter: only the row is left to commit), in an owned staging buffer (filled through layer_view),
    # or in a borrowed tensor (a mover's arena slot or snapshot, written from where it lies at registration).
    def _staged(self, slot: int) -> torch.Tensor:
        with self._stage_lock:
            entry = self._stage.get(slot)
            if entry is not None and entry[1]:
                return entry[0]
            written = self._written.pop(slot, None)
        t = self.staging.take(1)[0]
        if written is not None:
            self.store.read_data(slot, t)  # scattered, then edited layer by layer: rare, so read it back
        elif entry is not None:
            t.copy_(entry[0])
        else:
            t.zero_()  # a block filled layer by layer: what is never written reads as zeros, as on a fresh arena
        with self._stage_lock:
            old = self._stage.get(slot)
            if old is not None and old[1]:
                self.staging.give([t])
                return old[0]
            self._stage[slot] = (t, True)
            return t

    def mutable_view(self, slot: int, layer: int, outer: int) -> torch.Tensor:
        return self._staged(slot)[layer, outer]

    def scatter(self, slots: Sequence[int], data: torch.Tensor) -> None:
        """Write ``data`` straight into the slots (no staging copy); registration then only commits the rows."""
        self.check_batch(len(slots), data)
        for s in slots:
            self.drop_stage(s)
        checksums = self.store.write_data(slots, data)
        with self._stage_lock:
            for s, c in zip(slots, checksums):
                self._written[s] = c

    def stage_views(self, slots: Sequence[int], views: Sequence[torch.Tensor], *, borrow: bool = True) -> None:
        """Stage block tensors for the next :meth:`commit`.

        ``borrow=True``: no copy; the caller keeps their bytes intact until the blocks are registered or released
        (the scheduler's movers write arena slots and snapshots straight to disk this way). ``borrow=False``: one
        copy each into aligned staging buffers.
        """
        owned = [] if borrow else self.staging.take(len(slots))
        entries = []
        for i, v in enumerate(views):
            if borrow:
                entries.append((v.to("cpu") if v.device.type != "cpu" else v, False))
            else:
                owned[i].copy_(v)
                entries.append((owned[i], True))
        with self._stage_lock:
            old = [self._stage.get(s) for s in slots]
            for slot, e in zip(slots, entries):
                self._stage[slot] = e
                self._written.pop(slot, None)
        self.staging.give([e[0] for e in old if e is not None and e[1]])

    def drop_stage(self, slot: int) -> None:
        with self._stage_lock:
            e = self._stage.pop(slot, None)
            self._written.pop(slot, None)
        if e is not None and e[1]:
            self.staging.give([e[0]])

    def commit(
        self,
        slots: Sequence[int],
        hashes: Sequence[bytes],
        tokens: Sequence[bytes | None] | None = None,
        parents: Sequence[bytes | None] | None = None,
    ) -> None:
        # Crash ordering is DiskStore's: all data of the batch (what scatter did not write yet is written now,
        # each block from where it is staged, no stacking), then one registry commit.
        with self._stage_lock:
            staged = [self._stage.get(s) for s in slots]
            written = [self._written.get(s) for s in slots]
        todo = [i for i, c in enumerate(written) if c is None]
        checksums: list[int | None] = list(written)
        if todo:
            zeros = None
            parts = []
            for i in todo:
                e = staged[i]
                if e is None:  # registered without being written: its bytes are zeros, as in a fresh memory tier
                    if zeros is None:
                        zeros = torch.zeros(self.model.block_shape, dtype=self.model.torch_dtype)
                    parts.append(zeros)
                else:
                    parts.append(e[0])
            for i, c in zip(todo, self.store.write_data([slots[i] for i in todo], parts)):
                checksums[i] = c
        self.store.commit_written(
            list(hashes), list(slots), [int(c) for c in checksums if c is not None], tokens,
            parents if parents is not None else [None] * len(slots),
        )
        for s in slots:
            self.drop_stage(s)

    # -- reads ----------------------------------------------------------------------------------------------------
    def read_view(self, slot: int, layer: int, outer: int) -> torch.Tensor:
        data, bad = self.gather([slot])
        if bad:
            raise CorruptBlockError(f"disk block in slot {slot} failed verification")
        return data[0, layer, outer].clone()

    def gather(self, slots: Sequence[int], out: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int]]:
        if out is None:
            out = self.store.alloc_blocks(len(slots))
        return out, self.read_into(slots, out)

    def read_into(
        self, slots: Sequence[int], out: torch.Tensor | Sequence[torch.Tensor] | Sequence[np.ndarray]
    ) -> list[int]:
        """Read blocks straight into ``out`` (a batch, or one destination tensor per block); returns the indices
        that failed verification (dropped from the store). A closed store raises DiskTierError."""
        try:
            return self.store.read_into(slots, out)
        except DiskTierError:
            if self.store.closed:
                raise
            # A slot lost its row under us (another reader found it corrupt): read one by one, mark the lost.
            dests: list[Any] = [out[i] for i in range(len(slots))]
            bad = []
            for i, s in enumerate(slots):
                try:
                    if self.store.read_into([s], [dests[i]]):
                        bad.append(i)
                except DiskTierError:
                    if self.store.closed:
                        raise
                    bad.append(i)
            return bad

    # -- registry -------------------------------------------------------------------------------------------------
    def discard(self, slots: Sequence[int], hashes: Sequence[bytes]) -> None:
        # DiskStore.delete commits before it returns: only then does the pool reuse the slots.
        self.store.delete(list(hashes))

    def touch(self, hashes: Sequence[bytes]) -> None:
        """Record hits (last access time, hit count) on stored blocks."""
        self.store.touch(list(hashes))

    def stored_slots(self) -> list[tuple[bytes, int, bytes | None, bytes | None]]:
        """``(hash, slot, token ids, parent)`` of every stored block, least recently used first."""
        return self.store.slot_order()

    def stored_hashes(self) -> set[bytes]:
        """Every hash with a live row."""
        return {h for h, *_ in self.store.slot_order()}

    def compact(self, exclude: Sequence[int]) -> dict[bytes, tuple[int, int]]:
        """Move stored blocks to the lowest slots (see ``DiskStore.compact``); returns their moves."""
        return self.store.compact(exclude)

    def flush(self) -> None:
        """Make every committed block durable."""
        self.store.flush()

    def close(self) -> None:
        self.store.close()


#: The old name of :class:`DiskBlockStorage` (too close to :class:`DiskStore`); kept so existing imports work.
DiskStorage = DiskBlockStorage


def open_disk_storage(config: KvBlockManagerConfig, backend: DiskBackend | None = None) -> DiskBlockStorage:
    """Open (or create) the disk tier that ``config.disk`` names, for writing."""
    assert config.disk is not None
    store = DiskStore(
        config.disk, config.model, hash_algorithm=config.hash_algorithm, namespace=config.namespace, backend=backend
    )
    return DiskBlockStorage(store, pinned=config.resolved_device_type == "cuda")
