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
from .sources import MatchSource, SnapshotBlock, SnapshotSource
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
        self._known: OrderedDict[bytes, None] = OrderedDict()  # recently written or seen hashes (bounded)
        self._known_cap = 1 << 20
        self.hits = 0
        self.misses = 0
        self.writes = 0
        self.dropped_writes = 0
        self.queue: WorkQueue[tuple[list[bytes], torch.Tensor, list[bytes | None]]] = WorkQueue(
            remote.max_queued_blocks, lambda job: len(job[0]), self._write, 1, "tiered-kv-remote-writer"
        )
        self.max_fetch = 1 << 30

    # -------------------------------------------------------------------------------------------- writes
    def enqueue(
        self,
        hashes: Sequence[bytes],
        data: torch.Tensor,
        tokens: Sequence[bytes | None] | None = None,
        *,
        owned: bool = False,
    ) -> None:
        """Queue blocks for a background write (a snapshot: the caller may reuse its memory), with their token
        ids when known (stored with each value, so that a later match with ``tokens=`` can check them).

        ``owned``: ``data`` is already a private copy that the caller hands over (e.g. a fresh ``gather``); when
        every block is queued it is kept as it is (moved to the CPU if it is not there), with no second copy.
        """
        keep = [i for i, h in enumerate(hashes) if h not in self._known]
        if not keep:
            return
        take = keep[: self.queue.reserve(len(keep))]
        self.dropped_writes += len(keep) - len(take)
        if not take:
            return
        try:
            if owned and len(take) == len(hashes):
                snap = data.to("cpu")  # no copy for CPU data
            else:
                snap = data.index_select(0, torch.tensor(take, device=data.device)).to("cpu")
        except BaseException:
            self.queue.unreserve(len(take))
            raise
        queued = [hashes[i] for i in take]
        toks: list[bytes | None] = [tokens[i] for i in take] if tokens is not None else [None] * len(take)
        self._remember(queued)  # queued counts as known: another tier registering it must not queue it twice
        self.queue.put((queued, snap, toks))

    def _write(self, job: tuple[list[bytes], torch.Tensor, list[bytes | None]]) -> None:
        hashes, data, tokens = job
        try:
            written = self.store.put_blocks(hashes, data, tokens)
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

    def known(self, h: bytes) -> bool:
        """Whether ``h`` was recently written here or seen in a hit (a bounded memory; no round trip)."""
        return h in self._known

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until queued writes are sent; False on timeout."""
        return self.queue.drain(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (up to ``timeout``), then stop and disconnect."""
        dropped = sum(len(job[0]) for job in self.queue.stop(timeout))
        if dropped:
            self.dropped_writes += dropped
            log.warning("remote tier: %d queued writes dropped at close", dropped)
        self.store.close()

    # ---------------------------------------------------------------------------------------------- reads
    def may_hold(self, sequence_hash: bytes) -> bool:
        """Always True: only the round trip in :meth:`match_run` can tell (see :meth:`MatchSource.may_hold`)."""
        return True

    def __contains__(self, h: object) -> bool:
        """Whether the servers hold the hash now (one round trip)."""
        if not isinstance(h, bytes):
            return False
        return bool(self.store.exists([h])[0])

    def match_run(
        self, hashes: list[bytes], start: int, higher: Sequence[MatchSource], expected: list[bytes] | None = None
    ) -> list[Any]:
        """See :meth:`MatchSource.match_run`. One pipelined GET of up to ``max_fetch`` hashes.

        Values carry the token ids their writer knew: with ``expected``, a value stored with other token ids ends
        the run (a hash collision is a miss); a value stored without any is trusted to the sequence hash.
        """
        want: list[bytes] = []
        for i in range(start, min(len(hashes), start + self.max_fetch)):
            h = hashes[i]
            if want and any(p.may_hold(h) for p in higher):
                break
            want.append(h)
        if not want:
            return []
        data, ok, toks = self.store.get_blocks_with_tokens(want)
        out: list[SnapshotBlock] = []
        for i, h in enumerate(want):
            if not ok[i]:
                break
            if expected is not None and toks[i] not in (None, expected[start + i]):
                break
            out.append(SnapshotBlock(self, h, data[i], toks[i]))
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
        return self._remote.match_run(list(hashes), 0, ())

    def contains(self, hashes: Sequence[bytes]) -> list[bool]:
        """Which hashes the remote tier holds (one pipelined EXISTS; nothing is fetched)."""
        return self._remote.store.exists(list(hashes))

    def metrics(self) -> dict[str, Any]:
        """See :meth:`RemoteTier.metrics`."""
        return self._remote.metrics()
