"""What "lost" means, and how it is checked.

A block is *durable* once its registration in the disk tier has been made durable by ``sync_disk()``. At a
checkpoint the ledger takes the set of hashes in the disk tier, THEN calls ``sync_disk()`` (not ``flush()``: a
checkpoint must not drain the movers' queues or force the writeback, or it would dominate the run it checks):
everything in the set was committed before the sync began, so the sync made it durable. (Taking the set after
the sync would claim blocks committed during it, which ``batch`` durability has not synced yet.)

A durable block stays required until the disk tier reports it removed (a ``"removed"`` KvEvent on tier
``"disk"``: an eviction, or a block dropped because it failed its checksum). A required block that the disk tier
does not hold, live or after a reopen, is **lost**. A required block that it holds with other bytes is
**wrong**. A required block that fails its checksum on the reopen read is a *detected* corruption (only
expected when faults are injected).

Removal events arrive on the event dispatcher thread, a little after the removal. The ledger numbers each one
as it arrives; a checkpoint only claims hashes with no removal numbered after the checkpoint started, so a block
evicted while the sync ran is never claimed. A live check takes the disk tier's hashes under its lock
(a removal publishes its event under that lock), then delivers the queued events itself before it calls a block
lost: no grace period, no clock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..events import KvEvent
from ..manager import KvBlockManager
from .content import BlockContent

__all__ = ["DiskLedger", "ReopenCheck", "verify_disk"]

class DiskLedger:
    """Tracks which hashes the disk tier must hold (see the module docstring).

    Args:
        bm: the store (its events are subscribed to).
        on_removed: also called with every batch of removed disk hashes (the child journals them).
    """

    def __init__(self, bm: KvBlockManager, on_removed: Callable[[list[bytes]], None] | None = None) -> None:
        self.bm = bm
        self.required: set[bytes] = set()
        self._seq = 0
        self._removed_at: dict[bytes, int] = {}
        self._lock = threading.Lock()
        self._on_removed = on_removed
        self._unsubscribe = bm.subscribe(self._event)

    def _event(self, ev: KvEvent) -> None:
        if ev.kind != "removed" or ev.tier != "disk":
            return
        with self._lock:
            self._seq += 1
            for h in ev.sequence_hashes:
                self._removed_at[h] = self._seq
                self.required.discard(h)
        if self._on_removed is not None:
            self._on_removed(list(ev.sequence_hashes))

    def checkpoint(self) -> list[bytes]:
        """Sync the disk tier, and return the hashes newly known durable (also added to :attr:`required`)."""
        disk = self.bm.disk()
        assert disk is not None
        with self._lock:
            mark = self._seq
        snapshot = disk.cached_hashes()
        self.bm.sync_disk()
        with self._lock:
            new = [h for h in snapshot if self._removed_at.get(h, -1) <= mark and h not in self.required]
            self.required.update(new)
        return new

    def missing_live(self) -> list[bytes]:
        """Required hashes the live disk tier does not hold.

        No grace period: the pool publishes a removal's event under its lock, so once the snapshot (taken under
        that lock) misses a block, its event is queued; delivering the queue on this thread settles the ledger.
        """
        disk = self.bm.disk()
        assert disk is not None
        present = set(disk.cached_hashes())
        self.bm.deliver_events_now()
        with self._lock:
            return [h for h in self.required if h not in present]

    def close(self) -> None:
        """Stop listening."""
        self._unsubscribe()


@dataclass
class ReopenCheck:
    """The outcome of checking a disk tier after a reopen."""

    verified: int = 0
    wrong: int = 0
    lost: int = 0
    corrupt: int = 0  # failed their checksum on the read (detected; a fault when faults are injected)
    corrupt_required: int = 0  # of those, blocks that were durable (lost, unless faults were injected)
    unreachable: int = 0  # durable blocks the reopen dropped because an ancestor was lost (orphans)
    not_prefix_closed: int = 0  # blocks on disk whose parent is not on disk after the reopen (must be 0)
    examples: list[str] = field(default_factory=list)


def verify_disk(
    bm: KvBlockManager, content: BlockContent, required: Iterable[bytes], *, batch: int = 64
) -> ReopenCheck:
    """Check a freshly opened disk tier: every required hash is there with its bytes, and every block it holds
    has the right bytes.

    Args:
        bm: a manager opened on the tier (its disk pool is read directly, nothing is promoted).
        content: block bytes per hash.
        required: hashes that must be present (durable before a crash, never reported removed).
    """
    disk = bm.disk()
    assert disk is not None
    out = ReopenCheck()
    required = set(required)
    present = set(disk.cached_hashes())
    pruned = set(bm.dropped_at_open)
    for h in sorted(required - present):
        if h in pruned:
            out.unreachable += 1  # its chain was broken on disk (an ancestor lost): dropped, by design
            continue
        out.lost += 1
        if len(out.examples) < 5:
            out.examples.append(f"durable block {h.hex()[:16]} is gone after the reopen")
    # Prefix-closed: every block on disk has its parent on disk (or none).
    for h in present:
        par = disk.parent_of(h)
        if par is not None and par not in present:
            out.not_prefix_closed += 1
            if len(out.examples) < 5:
                out.examples.append(f"disk block {h.hex()[:16]} has no parent on disk after the reopen")
    hashes = sorted(present)
    for i in range(0, len(hashes), batch):
        want = hashes[i : i + batch]
        blocks = []
        try:
            for h in want:  # one hash at a time: a pool match is a prefix match
                blocks.extend(disk.match_sequence_hashes([h]))
            found = [b.sequence_hash for b in blocks]
            for h in set(want) - set(found):
                if h in required:
                    out.lost += 1
            if not blocks:
                continue
            data, bad = disk.gather(blocks)
            bad_set = set(bad)
            out.corrupt += len(bad_set)
            out.corrupt_required += sum(1 for j in bad_set if found[j] in required)
            good = [j for j in range(len(blocks)) if j not in bad_set]
            wrong = content.matches_data(data[good], [found[j] for j in good]) if good else []
            out.verified += len(good)
            out.wrong += len(wrong)
            for j in wrong[:5]:
                out.examples.append(f"disk block {found[good[j]].hex()[:16]} has wrong bytes after the reopen")
        finally:
            disk.release_blocks(blocks)
    return out
