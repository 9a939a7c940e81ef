"""Match sources: what a match looks through, top to bottom.

The manager looks a request's hashes up in an ordered list of sources: each pool (device, host, disk), with the
snapshots queued toward the disk just above the disk pool, and the remote tier last. Every source speaks the
:class:`MatchSource` protocol; the manager uses nothing else of them, and the offload scheduler copies their
blocks (:meth:`tiered_kv.offload.OffloadScheduler.copy`).

Two kinds of handles come back from :meth:`MatchSource.match_run`:

* pool blocks (:class:`~tiered_kv.blocks.ImmutableBlock`), whose bytes stay in the pool's storage and which hold
  a reference there until released;
* :class:`SnapshotBlock` handles, whose bytes travel with the handle (a block queued toward the disk, or fetched
  from the remote tier); nothing is held anywhere, releasing only marks the handle.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["MatchSource", "SnapshotBlock", "SnapshotSource", "InflightSource"]


@runtime_checkable
class MatchSource(Protocol):
    """The protocol of every match source (pools, the in-flight disk queue, the remote tier).

    Attributes:
        tier: the source's name ("device", "host", "disk", "disk-queue", "remote").
    """

    tier: str

    def may_hold(self, sequence_hash: bytes) -> bool:
        """False only when the source certainly lacks the hash; never blocks (no lock, no I/O).

        Local sources answer exactly (a lock-free look at their index, which may be a moment stale); the remote
        tier answers True, since only the round trip in :meth:`match_run` can tell.
        """
        ...

    def __contains__(self, sequence_hash: object) -> bool:
        """Whether the source holds the hash now (the remote tier asks its servers)."""
        ...

    def match_run(
        self,
        hashes: list[bytes],
        start: int,
        higher: Sequence[MatchSource],
        expected: list[bytes] | None = None,
    ) -> list[Any]:
        """Take the run of ``hashes[start:]`` held here, stopping at the first hash missing here or (after the
        first) present in a ``higher`` source (checked with :meth:`may_hold`), or whose stored tokens differ from
        ``expected[i]`` when given. Returns held handles; the caller releases them with :meth:`release_blocks`."""
        ...

    def gather(self, blocks: Sequence[Any], out: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int]]:
        """The handles' bytes as one ``(n, *block_shape)`` tensor (into ``out`` when given), and the indices of
        handles whose bytes failed verification (a source drops those)."""
        ...

    def tokens_of(self, blocks: Sequence[Any]) -> list[bytes | None]:
        """The token bytes each handle was registered with (None where unknown)."""
        ...

    def parents_of(self, blocks: Sequence[Any]) -> list[bytes | None]:
        """The parent hash of each handle (None for a root or where unknown)."""
        ...

    def release_blocks(self, blocks: Sequence[Any]) -> None:
        """Release handles taken by :meth:`match_run`."""
        ...


class SnapshotBlock:
    """A block whose bytes travel with the handle (queued toward disk, or fetched from the remote tier).

    Nothing is held in any pool, so releasing it only marks the handle.
    """

    __slots__ = ("_pool", "_released", "block_id", "data", "sequence_hash", "tokens")

    def __init__(self, source: SnapshotSource, h: bytes, data: torch.Tensor, tokens: bytes | None) -> None:
        self._pool = source
        self._released = False
        self.block_id = -1
        self.sequence_hash = h
        self.data = data
        self.tokens = tokens

    @property
    def tier(self) -> str:
        """The source's name ("disk-queue", "remote")."""
        return self._pool.tier

    @property
    def released(self) -> bool:
        """Whether :meth:`release` was called."""
        return self._released

    def layer_view(self, layer: int, outer: int) -> torch.Tensor:
        """A copy of one layer's K or V."""
        return self.data[layer, outer].clone()

    def release(self) -> None:
        """Mark the handle released (its source may then reuse the snapshot's buffer)."""
        if not self._released:
            self._released = True
            self._pool._readers_done([self.data])


class SnapshotSource:
    """Shared part of the sources whose handles are :class:`SnapshotBlock` (bytes carried by the handle)."""

    tier: str

    def gather(self, blocks: Sequence[Any], out: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int]]:
        """Stack the handles' bytes (already verified when they were taken)."""
        data = torch.stack([b.data for b in blocks])
        if out is not None:
            out.copy_(data)
            return out, []
        return data, []

    def tokens_of(self, blocks: Sequence[Any]) -> list[bytes | None]:
        """The token ids each block carries, where known."""
        return [b.tokens for b in blocks]

    def parents_of(self, blocks: Sequence[Any]) -> list[bytes | None]:
        """The parents of the blocks, where known (a remote block does not carry one)."""
        return [None] * len(blocks)

    def release_blocks(self, blocks: Sequence[Any]) -> None:
        """Mark the handles released."""
        done = []
        for b in blocks:
            if not b._released:
                b._released = True
                done.append(b.data)
        if done:
            self._readers_done(done)

    def _readers_done(self, data: list[torch.Tensor]) -> None:
        """Handles carrying these tensors were released (a source that reuses buffers counts its readers)."""


class InflightSource(SnapshotSource):
    """Snapshots of blocks queued toward a persistent tier, matchable until their write lands.

    The offload scheduler puts a snapshot here when it queues a demotion or a writeback, and drops it once the
    write is registered in the destination pool (or given up).
    """

    def __init__(self, tier: str) -> None:
        self.tier = f"{tier}-queue"
        self._lock = threading.Lock()
        self._data: dict[bytes, tuple[torch.Tensor, bytes | None]] = {}
        # Snapshot buffers are reused once written (see recycle): handed-out handles not yet released, by buffer,
        # and the buffers whose write is done but whose last reader has not released them yet.
        self._readers: dict[int, int] = {}
        self._retired: dict[int, tuple[torch.Tensor, Callable[[list[torch.Tensor]], None]]] = {}
        self._parents: dict[bytes, bytes | None] = {}
        self._children: dict[bytes, set[bytes]] = {}

    def put(
        self,
        hashes: Sequence[bytes],
        data: torch.Tensor | Sequence[torch.Tensor],
        tokens: Sequence[bytes | None],
        parents: Sequence[bytes | None] | None = None,
    ) -> None:
        """Add snapshots (one tensor per hash), with their token bytes and parents."""
        with self._lock:
            for i, h in enumerate(hashes):
                self._data[h] = (data[i], tokens[i])
                par = parents[i] if parents is not None else None
                if par is not None:
                    self._parents[h] = par
                    self._children.setdefault(par, set()).add(h)

    def parent(self, h: bytes) -> bytes | None:
        """The parent a queued hash was registered with."""
        with self._lock:
            return self._parents.get(h)

    def children_of(self, h: bytes) -> list[bytes]:
        """Queued hashes whose parent is ``h``."""
        return self.children_of_many([h])

    def children_of_many(self, hashes: Sequence[bytes]) -> list[bytes]:
        """Queued hashes whose parent is one of ``hashes``."""
        with self._lock:
            return [c for h in hashes for c in self._children.get(h, ())]

    def parents_of(self, blocks: Sequence[Any]) -> list[bytes | None]:
        """The parents the queued blocks were registered with."""
        with self._lock:
            return [self._parents.get(b.sequence_hash) for b in blocks]

    def drop(self, hashes: Sequence[bytes]) -> None:
        """Forget snapshots (their write landed, or was given up)."""
        with self._lock:
            for h in hashes:
                self._data.pop(h, None)
                par = self._parents.pop(h, None)
                if par is not None:
                    kids = self._children.get(par)
                    if kids is not None:
                        kids.discard(h)
                        if not kids:
                            del self._children[par]

    def clear(self) -> None:
        """Forget every snapshot."""
        with self._lock:
            self._data.clear()
            self._parents.clear()
            self._children.clear()

    def may_hold(self, sequence_hash: bytes) -> bool:
        """Exact, lock-free (see :meth:`MatchSource.may_hold`)."""
        return sequence_hash in self._data

    def __contains__(self, h: object) -> bool:
        return h in self._data

    def __len__(self) -> int:
        return len(self._data)

    def match_run(
        self, hashes: list[bytes], start: int, higher: Sequence[MatchSource], expected: list[bytes] | None = None
    ) -> list[Any]:
        """See :meth:`MatchSource.match_run`."""
        out: list[SnapshotBlock] = []
        with self._lock:
            for i in range(start, len(hashes)):
                h = hashes[i]
                entry = self._data.get(h)
                if entry is None or (out and any(p.may_hold(h) for p in higher)):
                    break
                if expected is not None and entry[1] not in (None, expected[i]):
                    break
                out.append(SnapshotBlock(self, h, entry[0], entry[1]))
                key = id(entry[0])
                self._readers[key] = self._readers.get(key, 0) + 1
        return out

    def _readers_done(self, data: list[torch.Tensor]) -> None:
        free: list[tuple[torch.Tensor, Callable[[list[torch.Tensor]], None]]] = []
        with self._lock:
            for t in data:
                key = id(t)
                n = self._readers.get(key, 0) - 1
                if n > 0:
                    self._readers[key] = n
                    continue
                self._readers.pop(key, None)
                retired = self._retired.pop(key, None)
                if retired is not None:
                    free.append(retired)
        for t, give in free:
            give([t])

    def recycle(self, data: Sequence[torch.Tensor], give: Callable[[list[torch.Tensor]], None]) -> None:
        """Hand snapshot buffers whose write is done (and whose hashes were dropped) back through ``give``, each
        once no handle from :meth:`match_run` still reads it; until then it waits for its last reader's release.
        A handle never released keeps its buffer out of reuse (it is freed with the handle)."""
        now: list[torch.Tensor] = []
        with self._lock:
            for t in data:
                if self._readers.get(id(t), 0) > 0:
                    self._retired[id(t)] = (t, give)
                else:
                    now.append(t)
        if now:
            give(now)
