"""The remote tier: blocks shared across serving nodes through Redis, below the disk tier.

* Lookup: a match that misses every local tier asks the remote tier last, with ONE pipelined GET of the
  remaining prefix (bounded by what the top tier can hold); what comes back verified is promoted like any
  lower-tier block. Header and checksum failures, timeouts and dead nodes are misses.
* Placement: ``write_back`` writes the victims of the lowest local tier; ``write_through`` writes every block
  registered in any local tier (once: hashes known to be remote are remembered). Writes are queued and sent by
  a background thread in pipelined batches; when the queue is full, writes are dropped and counted.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from .config import KvBlockManagerConfig, RemoteConfig
from .offload import SnapshotBlock, SnapshotSource
from .storage.remote import RemoteStore
from .workqueue import WorkQueue

__all__ = ["RemoteTier", "RemotePoolView"]

log = logging.getLogger("tiered_kv.remote")


class RemoteTier(SnapshotSource):
    """The remote store plus its write queue; a match source for the manager."""

    def __init__(self, config: KvBlockManagerConfig, remote: RemoteConfig) -> None:
        self.config = remote
        self.mode = remote.mode
        self.tier = "remote"
        self.store = RemoteStore(
            remote.urls,
            model=config.model,
            namespace=config.namespace,
            hash_algorithm=config.hash_algorithm,
            timeout=remote.timeout,
            username=remote.username,
            password=remote.password,
            ssl=remote.ssl,
            ssl_ca_certs=remote.ssl_ca_certs,
        )
        self._by_hash: dict[bytes, Any] = {}  # nothing is "held" remotely; present for run detection
        self._known: OrderedDict[bytes, None] = OrderedDict()  # recently written or seen hashes (bounded)
        self._known_cap = 1 << 20
        self.hits = 0
        self.misses = 0
        self.writes = 0
        self.dropped_writes = 0
        self.queue: WorkQueue[tuple[list[bytes], torch.Tensor]] = WorkQueue(
            remote.max_queued_blocks, lambda job: len(job[0]), self._write, 1, "tiered-kv-remote-writer"
        )
        self.max_fetch = 1 << 30

    # -------------------------------------------------------------------------------------------- writes
    def enqueue(self, hashes: Sequence[bytes], data: torch.Tensor) -> None:
        """Queue blocks for a background write (a snapshot: the caller may reuse its memory)."""
        keep = [i for i, h in enumerate(hashes) if h not in self._known]
        if not keep:
            return
        take = keep[: self.queue.reserve(len(keep))]
        self.dropped_writes += len(keep) - len(take)
        if not take:
            return
        try:
            snap = data.index_select(0, torch.tensor(take, device=data.device)).to("cpu")
        except BaseException:
            self.queue.unreserve(len(take))
            raise
        queued = [hashes[i] for i in take]
        self._remember(queued)  # queued counts as known: another tier registering it must not queue it twice
        self.queue.put((queued, snap))

    def _write(self, job: tuple[list[bytes], torch.Tensor]) -> None:
        hashes, data = job
        try:
            written = self.store.put_blocks(hashes, data)
        except Exception:  # counted as dropped; the queue's worker logs nothing more
            log.exception("remote write of %d blocks failed", len(hashes))
            written = 0
        self.writes += written
        if written != len(hashes):
            self.dropped_writes += len(hashes) - written
            self._forget(hashes)  # which ones failed is unknown: let a later eviction try again

    def _remember(self, hashes: Sequence[bytes]) -> None:
        known = self._known
        for h in hashes:
            known[h] = None
            known.move_to_end(h)
        while len(known) > self._known_cap:
            known.popitem(last=False)

    def _forget(self, hashes: Sequence[bytes]) -> None:
        for h in hashes:
            self._known.pop(h, None)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until queued writes are sent; False on timeout."""
        return self.queue.drain(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (up to ``timeout``), then stop and disconnect."""
        dropped = sum(len(h) for h, _ in self.queue.stop(timeout))
        if dropped:
            self.dropped_writes += dropped
            log.warning("remote tier: %d queued writes dropped at close", dropped)
        self.store.close()

    # ---------------------------------------------------------------------------------------------- reads
    def __contains__(self, h: object) -> bool:
        # The manager asks every source per hash; the remote tier is only worth a round trip in _match_run.
        return True

    def _match_run(
        self, hashes: list[bytes], start: int, higher: Sequence[Any], expected: list[bytes] | None = None
    ) -> list[SnapshotBlock]:
        want: list[bytes] = []
        for i in range(start, min(len(hashes), start + self.max_fetch)):
            h = hashes[i]
            if want and any(h in p for p in higher):  # a higher source holds the rest of the run
                break
            want.append(h)
        if not want:
            return []
        data, ok = self.store.get_blocks(want)
        out: list[SnapshotBlock] = []
        for i, h in enumerate(want):
            if not ok[i]:
                break
            out.append(SnapshotBlock(self, h, data[i], None))
        self.hits += len(out)
        self.misses += 1 if len(out) < len(want) else 0
        if out:
            self._remember([b.sequence_hash for b in out])
        return out

    def metrics(self) -> dict[str, Any]:
        """The tier's counters (hits/misses as seen by matches) and the store's."""
        looked = self.hits + self.misses
        return {
            "mode": self.mode,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hits / looked if looked else 0.0,
            "writes": self.writes,
            "dropped_writes": self.dropped_writes,
            "queue_depth": self.queue.depth,
            "evictions": 0,  # Redis's maxmemory policy evicts; see the server's evicted_keys
            "store": self.store.metrics(),
        }


class RemotePoolView:
    """``bm.remote()``: match and metrics of the remote tier alone (no promotion)."""

    tier = "remote"

    def __init__(self, remote: RemoteTier) -> None:
        self._remote = remote

    def match_sequence_hashes(self, hashes: Sequence[bytes]) -> list[SnapshotBlock]:
        """The longest prefix of ``hashes`` the remote tier holds, fetched and verified."""
        return self._remote._match_run(list(hashes), 0, ())

    def contains(self, hashes: Sequence[bytes]) -> list[bool]:
        """Which hashes the remote tier holds (one pipelined EXISTS; nothing is fetched)."""
        return self._remote.store.exists(list(hashes))

    def metrics(self) -> dict[str, Any]:
        """See :meth:`RemoteTier.metrics`."""
        return self._remote.metrics()
