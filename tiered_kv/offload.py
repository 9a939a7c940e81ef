"""The offload scheduler: the only place that moves bytes between tiers in the background.

Demotion (write-back). When a pool evicts, its eviction handler (:meth:`OffloadScheduler.on_evict`) runs under
that pool's lock while the victims' bytes are still intact:

* a victim already present in the next tier is *clean*: nothing to copy (tiers are inclusive);
* a dirty victim going to a memory tier (device -> host) is copied at once (a memcpy; this is the only copy an
  allocation can wait for, and only when no clean victim was left);
* a dirty victim going to the disk tier is snapshotted into host memory and queued for a background writer, so
  an allocation never waits for disk I/O. While queued it stays matchable from the snapshot (the *in-flight*
  source, looked up between its source and its destination tier). The queue is bounded: when the disk cannot
  keep up, further demotions are dropped and counted instead of blocking serving.

Cleaning ahead of need. A cleaner thread watches the memory tiers: when a tier's free blocks fall below the low
watermark, it copies the policy's next victims down to the next tier while they stay in place (held by the
cleaner during the copy, so they remain matchable and cannot be evicted mid-copy). Later evictions of these
blocks are clean.

Promotion runs on the caller's thread (the match needs the result), one batch per source tier; concurrent
matches of the same hash share one promotion (see :class:`PromotionClaims`).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from .blocks import ImmutableBlock, MutableBlock
from .errors import DiskFullError, TieredKvError
from .metrics import LatencyHistogram
from .pool import PICK_WINDOW, BlockPool
from .sources import InflightSource, MatchSource, SnapshotBlock, SnapshotSource
from .transfer import TransferStreams, copy_between, copy_slots, snapshot_slots
from .workqueue import WorkQueue

__all__ = [
    "OffloadScheduler",
    "OffloadCounters",
    "LatencyHistogram",
    "InflightSource",
    "PromotionClaims",
    "SnapshotBlock",
    "SnapshotSource",
]

log = logging.getLogger("tiered_kv.offload")


@dataclass
class OffloadCounters:
    """Scheduler counters; ``per_pair`` keys are "device->host" style strings."""

    demotions: int = 0
    promotions: int = 0
    bytes_demoted: int = 0
    bytes_promoted: int = 0
    dropped_demotions: int = 0
    failed_transfers: int = 0
    corrupt_blocks: int = 0
    cleaned: int = 0
    shared_promotions: int = 0
    written_back: int = 0
    reaped: int = 0
    drops_by_cause: dict[str, int] = field(default_factory=dict)
    per_pair: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **kw: int) -> None:
        """Add to several counters atomically."""
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def pair(self, name: str, n: int) -> None:
        """Count ``n`` blocks moved along one tier pair."""
        with self.lock:
            self.per_pair[name] = self.per_pair.get(name, 0) + n


class PromotionClaims:
    """Hashes being promoted right now, so that concurrent matches share one copy."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._claims: dict[bytes, threading.Event] = {}

    def claim(self, hashes: Sequence[bytes]) -> tuple[list[bytes], list[threading.Event]]:
        """Claim the unclaimed hashes; returns (claimed, events of hashes another caller is promoting, one per
        claim). A claim's hashes share one event: :meth:`done` is called with all of them at once."""
        mine: list[bytes] = []
        theirs: dict[int, threading.Event] = {}
        event = threading.Event()
        with self._lock:
            for h in hashes:
                ev = self._claims.get(h)
                if ev is None:
                    self._claims[h] = event
                    mine.append(h)
                else:
                    theirs[id(ev)] = ev
        return mine, list(theirs.values())

    def done(self, hashes: Sequence[bytes]) -> None:
        """Release a claim (all the hashes :meth:`claim` returned as claimed) and wake whoever waits on it."""
        with self._lock:
            events = {id(ev): ev for h in hashes if (ev := self._claims.pop(h, None)) is not None}
        for ev in events.values():
            ev.set()


def _merge_jobs(a: _Job, b: _Job) -> _Job | None:
    """One job of two queued toward the same tier: one write and one registry commit instead of two."""
    if a.lower is not b.lower:
        return None
    return _Job(a.lower, a.pairs + b.pairs, a.hashes + b.hashes, a.data + b.data,
                a.tokens + b.tokens, a.parents + b.parents, min(a.queued_at, b.queued_at))


def _nowhere(h: bytes) -> bool:
    return False


#: Lost hashes (blocks that left every tier) that wake the reaper thread when no mover or match has reaped them.
REAP_BACKLOG = 1024

#: Spare staging memory kept allocated and faulted in for the snapshots of demotions (see StagingPool.keep_warm).
STAGING_WARM_BYTES = 32 << 20


@dataclass
class _Job:
    lower: BlockPool
    pairs: list[str]  # per block, the tier pair it moves along ("device->disk"): merged jobs mix them
    hashes: list[bytes]
    data: list[torch.Tensor]  # one snapshot per block, in aligned staging memory: written to disk in place
    tokens: list[bytes | None]
    parents: list[bytes | None]
    queued_at: float


class OffloadScheduler:
    """Background demotion (queue + writers) and cleaning ahead of need.

    Args:
        pools: the configured pools, top tier first.
        streams: CUDA copy streams (or disabled).
        max_queued_blocks: bound of the disk demotion queue, in blocks (default: 512 blocks or 256 MiB of
            snapshots, whichever is more, so that a burst of small blocks is absorbed instead of cut).
        low_watermark: fraction of a memory tier kept free-or-clean by the cleaner.
        workers: writer threads for the disk queue.
        background_cleaning: run a cleaner thread per memory tier (False: only :meth:`run_cleaner_once`).

    See :class:`tiered_kv.config.OffloadConfig` for what the knobs mean to a user.
    """

    def __init__(
        self,
        pools: list[BlockPool],
        streams: TransferStreams,
        *,
        max_queued_blocks: int | None = None,
        low_watermark: float = 0.25,
        clean_batch: int = 64,
        workers: int = 2,
        clean_interval: float = 1.0,
        writeback_s: float | None = None,
        background_cleaning: bool = True,
    ) -> None:
        self.pools = pools
        self.streams = streams
        self.counters = OffloadCounters()
        self.demote_latency = LatencyHistogram()
        self.promote_latency = LatencyHistogram()
        self.low_watermark = low_watermark
        self.clean_batch = clean_batch
        self._background_cleaning = background_cleaning
        self.clean_interval = clean_interval
        self.claims = PromotionClaims()
        self._stop = False
        self._closing = False
        self._lock = threading.Lock()
        self._prefetcher: ThreadPoolExecutor | None = None
        self._prefetches = 0  # submitted and not finished
        self._prefetch_done = threading.Condition()
        # One copier into each tier at a time (cleaners, writeback, persist, ancestors written ahead of a batch):
        # two copiers of the same hashes would each allocate room below, and the surplus would evict blocks just
        # copied. Reentrant: a copy into the disk first writes the batch's missing ancestors, into the same tier.
        self._copy_locks: dict[str, threading.RLock] = {pool.tier: threading.RLock() for pool in pools}
        self._copies_idle: dict[str, threading.Event] = {}
        self.inflight: dict[str, InflightSource] = {}
        self._threads: list[threading.Thread] = []
        self._kicks: list[threading.Event] = []
        self._block_bytes = pools[0].model.block_size_bytes
        self._lost: deque[bytes] = deque()  # hashes that left the hierarchy; their descendants are reaped
        # Reaping runs on the movers' threads and at matches; callers that only use pools directly (no manager
        # call, no movers) would let the lost hashes pile up: past REAP_BACKLOG a reaper thread takes them.
        self._reap_kick = threading.Event()
        self._reap_done = threading.Condition()  # notified after each pass of the reaper thread
        for lower in pools[1:]:
            if lower.storage.persistent:
                self.inflight[lower.tier] = InflightSource(lower.tier)
        # One pool and no queue: the pool is the whole hierarchy, and only hashes with children in it can leave
        # anything unreachable (see BlockPool.set_removal_hook).
        alone = len(pools) == 1 and not self.inflight
        for pool in pools:
            pool.set_removal_hook(self._note_lost, only_parents=alone)
        for upper, lower in itertools.pairwise(pools):  # after every queue exists: handlers look further down
            upper.set_eviction_handler(self._make_handler(upper, lower))
        # A persistent tier takes a block only when its parent is there too (or written in the same batch, or queued
        # ahead of it toward that tier): what is on disk stays prefix-closed, across restarts and crashes. Memory
        # tiers may hold a block before its parent arrives (the reaper drops them once the parent is lost).
        for pool in pools:
            if pool.storage.persistent:
                queued = self.inflight.get(pool.tier)
                pool.set_parent_lookup(queued.__contains__ if queued is not None else _nowhere)
                if queued is not None and pool.storage.staging is not None:
                    # Snapshots of demotions land in resident memory: up to 32 MiB kept warm, 8 to 64 buffers.
                    warm = max(8, min(64, STAGING_WARM_BYTES // self._block_bytes))
                    pool.storage.staging.keep_warm(warm * self._block_bytes)
        # Disk demotions waiting for a writer; drain() also waits for cleaning passes (busy sections).
        self.queue: WorkQueue[_Job] = WorkQueue(
            max_queued_blocks if max_queued_blocks is not None else max(512, (256 << 20) // self._block_bytes),
            lambda job: len(job.hashes),
            self._write,
            workers if any(p.storage.persistent for p in pools[1:]) else 0,
            "tiered-kv-writer",
            merge=_merge_jobs,
            merge_units=256,
        )
        self.writeback_s = writeback_s
        self._wb_lock = threading.Lock()
        self._wb_done = threading.Condition()
        self._wb_kick = threading.Event()  # a registration while the writeback sleeps with nothing pending
        self._wb_nudge = threading.Event()  # stop() or a waiter: run a pass now, whatever the ages
        self._wb_urgent = 0  # callers of wait_for_writeback(): passes write every block, young ones too
        # (sequence, first seen by a pass, pool, hash): registrations taken from the pools, not yet written.
        self._wb_pending: list[tuple[int, float, BlockPool, bytes]] = []
        self._wb_disk = next((p for p in pools if p.storage.persistent), None)
        self._wb_pools = [p for p in pools if not p.storage.persistent and self._wb_disk is not None]
        if writeback_s is not None and self._wb_pools:
            seq = itertools.count().__next__  # atomic under the GIL: one order across all memory tiers
            for p in self._wb_pools:
                p.log_registrations(seq, self._wb_kick.set)
            self._spawn(self._writeback_loop, "tiered-kv-writeback")
        self._kicks.append(self._reap_kick)  # stop() wakes it
        self._spawn(self._reaper, "tiered-kv-reaper")
        for upper, lower in itertools.pairwise(pools):
            if not upper.storage.persistent and background_cleaning:
                kick = threading.Event()
                self._kicks.append(kick)
                upper.set_pressure_hook(self._reserve(upper), kick.set)
                self._spawn(partial(self._cleaner, upper, lower, kick), f"tiered-kv-clean-{upper.tier}")

    # ---------------------------------------------------------------------------------------- sources, copies
    def sources(self) -> list[MatchSource]:
        """The local match sources in lookup order: each pool, with the snapshots queued toward it just above."""
        out: list[MatchSource] = []
        for pool in self.pools:
            queued = self.inflight.get(pool.tier)
            if queued is not None:
                out.append(queued)
            out.append(pool)
        return out

    def drop_queued(self, tier: str) -> None:
        """Forget the snapshots queued toward ``tier`` (a reset of that tier); their writes are skipped."""
        queued = self.inflight.get(tier)
        if queued is not None:
            queued.clear()

    def copy(
        self,
        src: MatchSource | BlockPool,
        src_blocks: Sequence[Any],
        dst: BlockPool,
        dst_blocks: Sequence[MutableBlock],
        *,
        borrow: bool = False,
        count: bool = True,
    ) -> list[int]:
        """Copy ``src_blocks`` (handles of any match source) into ``dst_blocks`` of ``dst``: the one copy path.

        Promotion, swaps and ``copy_blocks`` call it on the caller's thread; demotion, cleaning and writeback use
        it from the scheduler's threads. The copy runs on this thread's copy stream (CUDA) and is complete when it
        returns.

        Args:
            borrow: the caller keeps the sources held until ``dst_blocks`` are registered (a persistent
                destination then writes straight from the source's bytes).
            count: add the blocks to the ``"<src>-><dst>"`` transfer counter.

        Returns:
            Indices of source blocks that failed verification (already dropped by their source); their
            destinations hold garbage and must not be registered.
        """
        bad = copy_between(src, src_blocks, dst, dst_blocks, self.streams, borrow=borrow)
        if count and len(src_blocks) > len(bad):
            self.counters.pair(f"{src.tier}->{dst.tier}", len(src_blocks) - len(bad))
        return bad

    def attach_remote(self, remote: Any, mode: str) -> None:
        """Feed the remote tier: ``write_back`` sends the victims of the lowest tier, ``write_through`` every
        block registered in any tier (hashes already remote are not read again)."""

        def write(pool: BlockPool, victims: list[tuple[bytes, int]]) -> None:
            # Under the pool's lock, before the slots are reused: their bytes are intact.
            todo = [(h, s) for h, s in victims if not remote.known(h)]
            if not todo:
                return
            data, bad = pool.storage.gather([s for _, s in todo])
            toks, _ = pool.lineage_at([s for _, s in todo])  # stored with the value: remote hits check them
            failed = set(bad)
            good = [i for i in range(len(todo)) if i not in failed]
            if failed and good:
                data = data.index_select(0, torch.tensor(good, device=data.device))
            if good:  # the gather made a fresh copy: the remote queue keeps it, no second snapshot
                remote.enqueue([todo[i][0] for i in good], data, [toks[i] for i in good], owned=True)

        if mode == "write_back":
            bottom = self.pools[-1]
            bottom.set_eviction_handler(partial(write, bottom))
        else:
            for pool in self.pools:
                pool.set_stored_handler(partial(write, pool))

    def _note_lost(self, hashes: list[bytes]) -> None:
        # A pool's removal hook: runs under that pool's lock, so it only records (and wakes the reaper thread).
        self._lost.extend(hashes)
        if len(self._lost) >= REAP_BACKLOG:
            self._reap_kick.set()

    def _reaper(self) -> None:
        while not self._stop:
            self._reap_kick.wait()
            self._reap_kick.clear()
            if self._stop:
                return
            try:
                self.reap()
            except TieredKvError as exc:  # a closing tier: the next call (or close) reaps what is left
                log.debug("reaping failed: %s", exc)
            except Exception:  # keep the reaper alive; the failure is logged
                log.exception("reaping failed")
            with self._reap_done:
                self._reap_done.notify_all()

    def wait_for_reaper(self, timeout: float) -> bool:
        """Wait until fewer than ``REAP_BACKLOG`` lost hashes wait for the reaper thread; False on timeout."""
        with self._reap_done:
            return self._reap_done.wait_for(lambda: len(self._lost) < REAP_BACKLOG or self._stop, timeout)

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    # ---------------------------------------------------------------------------------------------- demotion
    def _make_handler(self, upper: BlockPool, lower: BlockPool) -> Callable[[list[tuple[bytes, int]]], None]:
        pair = f"{upper.tier}->{lower.tier}"
        inflight = self.inflight.get(lower.tier)
        below = self.pools[self.pools.index(upper) + 1 :]
        # Where victims that the next memory tier cannot take go instead of being dropped: the disk queue.
        disk = next((p for p in below[1:] if p.storage.persistent), None)
        disk_queue = self.inflight.get(disk.tier) if disk is not None else None

        def on_evict(victims: list[tuple[bytes, int]]) -> None:
            # Under upper's lock, before the victims' slots are reused: their bytes are intact. A victim that some
            # lower tier (or the disk queue) holds already is clean: the hierarchy keeps a copy.
            dirty = [(h, s) for h, s in victims if not self._held_below(h, below)]
            if not dirty:
                return
            if inflight is None:
                rest = self._copy_now(upper, lower, pair, dirty)
                if rest and disk is not None and disk_queue is not None:
                    # Never drop the only copy: what the next memory tier could not take goes to the disk.
                    rest = self._enqueue(upper, disk, f"{upper.tier}->{disk.tier}", disk_queue, rest)
                cause = "no_room_below"
            else:
                rest = self._enqueue(upper, lower, pair, inflight, dirty)
                cause = "disk_queue_full"
            if rest:
                self._drop(rest, cause)

        return on_evict

    def _held_below(self, h: bytes, below: Sequence[BlockPool]) -> bool:
        if any(h in p for p in below):
            return True
        return any(h in q for q in self.inflight.values())

    def _drop(self, victims: Sequence[tuple[bytes, int]], cause: str) -> None:
        """Victims that leave the hierarchy without a copy: counted by cause, their descendants reaped later."""
        with self.counters.lock:
            self.counters.dropped_demotions += len(victims)
            self.counters.drops_by_cause[cause] = self.counters.drops_by_cause.get(cause, 0) + len(victims)
        self._lost.extend(h for h, _ in victims)

    def reap(self) -> int:
        """Drop every block whose ancestor left the hierarchy (it is unreachable: a match stops at the first miss).

        Runs outside every pool lock (writer and writeback threads, matches, ``flush()``); returns how many were
        dropped.
        """
        if not self._lost:
            return 0
        dropped = 0
        reaped: set[bytes] = set()  # dropped by this call: they come back through the removal hook, done already
        while self._lost:
            todo: list[bytes] = []
            while self._lost:
                h = self._lost.popleft()
                if h not in reaped:
                    todo.append(h)
            if not todo:
                break
            held = self._held_anywhere_many(todo)
            gone = [h for h in dict.fromkeys(todo) if h not in held]
            seen: set[bytes] = set()
            frontier = gone
            while frontier:
                kids = [c for p in self.pools for c in p.children_of_many(frontier)]
                kids += [c for q in self.inflight.values() for c in q.children_of_many(frontier)]
                frontier = [c for c in dict.fromkeys(kids) if c not in seen]
                seen.update(frontier)
            if seen:
                reaped |= seen
                orphans = list(seen)
                for q in self.inflight.values():
                    q.drop(orphans)
                for p in self.pools:
                    dropped += p.invalidate(orphans)
            dropped += self._reap_disk(todo)
        if dropped:
            self.counters.add(reaped=dropped)
        return dropped

    def _held_anywhere_many(self, hashes: Sequence[bytes]) -> set[bytes]:
        """Those of ``hashes`` that a tier or a queue holds, checked top-down under each pool's lock (one
        acquisition per pool): a block on its way down (an eviction handler runs under the upper pool's lock) is
        found in the tier it moves to."""
        held: set[bytes] = set()
        todo = list(dict.fromkeys(hashes))
        for p in self.pools:
            queue = self.inflight.get(p.tier)
            if queue is not None:
                held.update(h for h in todo if h in queue)
                todo = [h for h in todo if h not in held]
            if not todo:
                break
            found = p.holding(todo)
            if found:
                held |= found
                todo = [h for h in todo if h not in found]
        return held

    def _reap_disk(self, removed: Sequence[bytes]) -> int:
        """Keep the disk tier prefix-closed on its own: the disk descendants of blocks that left the disk (even
        if a memory tier still holds them) go too, so that a restart finds every block on disk reachable."""
        disk = self._wb_disk
        if disk is None:
            return 0
        queued = self.inflight.get(disk.tier)
        on_disk = disk.holding(removed)
        frontier = [h for h in removed if (queued is None or h not in queued) and h not in on_disk]
        seen: set[bytes] = set()
        while frontier:
            kids = disk.children_of_many(frontier)
            frontier = [c for c in dict.fromkeys(kids) if c not in seen]
            seen.update(frontier)
        return disk.invalidate(list(seen)) if seen else 0

    def _copy_now(
        self, upper: BlockPool, lower: BlockPool, pair: str, dirty: list[tuple[bytes, int]]
    ) -> list[tuple[bytes, int]]:
        """Copy dirty victims into the memory tier below; returns those it could not take."""
        t0 = time.perf_counter()
        todo = dirty
        try:
            # With cleaners running, dirty blocks at the bottom of ``lower`` mean its cleaner is behind (overload):
            # take only its free or clean room, and what does not fit goes on to the disk queue in one copy,
            # instead of a copy into ``lower`` plus a snapshot of what it pushes out under ``lower``'s lock.
            protect = self._dirty_victims(lower, len(dirty)) if self._background_cleaning else None
            dst = lower.allocate_up_to(len(dirty), protect)
            todo = dirty[: len(dst)]
            if dst:
                copy_slots(upper.storage, [s for _, s in todo], lower, dst)
                toks, pars = upper.lineage_at([s for _, s in todo])
                lower.release_blocks(lower.register_blocks(dst, [h for h, _ in todo], tokens=toks, parents=pars))
        except TieredKvError:
            log.exception("demotion of %d blocks %s failed", len(todo), pair)
            self.counters.add(failed_transfers=len(todo))
            return dirty
        n = len(todo)
        self.counters.add(demotions=n, bytes_demoted=n * self._block_bytes)
        self.counters.pair(pair, n)
        self.demote_latency.observe(time.perf_counter() - t0)
        return dirty[n:]

    def _dirty_victims(self, pool: BlockPool, n: int) -> frozenset[bytes] | None:
        """Among the next victims of a memory tier with tiers below it, those no lower tier (nor the disk queue)
        holds: evicting one would cost a snapshot copy on the evicting thread, under ``pool``'s lock.

        Movers that put blocks into ``pool`` protect these and take only free or clean room there: pushing a dirty
        block out would snapshot it under ``pool``'s lock, on the moving thread, while an allocation in the tier
        above waits. Cleaners always do; evictions do while cleaners run (a dirty bottom then means overload: the
        victim goes on to the disk queue in one copy, bypassing ``pool``); without cleaners (stepped tests and
        simulations) evictions keep the plain chain, each tier pushing out its least recent blocks. None: nothing
        is dirty, or ``pool`` has nothing below it (its victims are dropped without a copy).
        """
        below = self.pools[self.pools.index(pool) + 1 :]
        if not below or pool.storage.persistent or pool.free_blocks() >= n:
            return None
        # The window the pool picks unprotected victims from (BlockPool._pick_unprotected): all of it classified.
        dirty = frozenset(
            h for h in pool.eviction_candidates(PICK_WINDOW) if not self._held_below(h, below)
        )
        return dirty or None

    @staticmethod
    def _parents_first(upper: BlockPool, dirty: list[tuple[bytes, int]]) -> list[tuple[bytes, int]]:
        """Order victims so that a parent precedes its children in the batch: what overflows is chain tails."""
        depth: dict[bytes, int] = {}
        parent = dict(zip([h for h, _ in dirty], upper.lineage_at([s for _, s in dirty])[1]))
        for h, _ in dirty:
            chain = []
            x: bytes | None = h
            while x is not None and x in parent and x not in depth:
                chain.append(x)
                x = parent[x]
            d = depth.get(x, -1) if x is not None else -1
            for y in reversed(chain):
                d += 1
                depth[y] = d
        return sorted(dirty, key=lambda e: depth[e[0]])

    def _enqueue(
        self, upper: BlockPool, lower: BlockPool, pair: str, inflight: InflightSource, dirty: list[tuple[bytes, int]]
    ) -> list[tuple[bytes, int]]:
        """Snapshot dirty victims and queue them toward the disk; returns those the queue could not take."""
        dirty = self._parents_first(upper, dirty)
        take = dirty[: self.queue.reserve(len(dirty))]
        if not take:
            return dirty
        # A memory copy (device->host when the upper tier is the device) into aligned staging buffers that the
        # writer hands to the file as they are: never disk I/O on this path.
        staging = lower.storage.staging
        assert staging is not None  # persistent storages have one
        try:
            data = snapshot_slots(upper.storage, [s for _, s in take], staging)
        except BaseException:
            self.queue.unreserve(len(take))
            raise
        hashes = [h for h, _ in take]
        toks, pars = upper.lineage_at([s for _, s in take])
        inflight.put(hashes, data, toks, pars)
        self.queue.put(_Job(lower, [pair] * len(hashes), hashes, data, toks, pars, time.perf_counter()))
        return dirty[len(take) :]

    def _write(self, job: _Job) -> None:
        lower = job.lower
        inflight = self.inflight[lower.tier]
        # Hashes reaped while queued (an ancestor was lost) are no longer in the in-flight source: skip them.
        todo = [(i, h) for i, h in enumerate(job.hashes) if h not in lower and h in inflight]
        written = 0
        lost: list[tuple[bytes, int]] = []
        try:
            if todo:
                # A victim whose ancestors are still only in memory (a hot head) takes them down with it, first.
                self._write_ancestors(lower, [job.parents[i] for i, _ in todo], {h for _, h in todo})
                refused = lower.refused([h for _, h in todo], [job.parents[i] for i, _ in todo])
                lost = [(h, -1) for k, (_, h) in enumerate(todo) if k in refused]  # their chain missed the disk
                todo = [e for k, e in enumerate(todo) if k not in refused]
                protect = self._ancestors_on(lower, [job.parents[i] for i, _ in todo])
                dst = lower.allocate_up_to(len(todo), protect)
                # Parents precede children in a job: what finds no room is chain tails.
                lost += [(h, -1) for _, h in todo[len(dst) :]]
                todo = todo[: len(dst)]
                if dst:
                    # The snapshots stay referenced by the job until registration: staged without a copy.
                    lower.stage_views(dst, [job.data[i] for i, _ in todo], borrow=True)
                    toks = [job.tokens[i] for i, _ in todo]
                    pars = [job.parents[i] for i, _ in todo]
                    lower.release_blocks(
                        lower.register_blocks(dst, [h for _, h in todo], tokens=toks, parents=pars)
                    )
                    written = len(dst)
            cause = "no_room_on_disk"
        except DiskFullError:
            log.warning("disk full: %d demoted blocks dropped", len(todo))
            self.counters.add(failed_transfers=len(todo))
            lost += [(h, -1) for _, h in todo]
            cause = "disk_full"
        except Exception as exc:
            pairs = ", ".join(sorted(set(job.pairs)))
            if isinstance(exc, TieredKvError):
                log.exception("writing %d demoted blocks (%s) failed", len(todo), pairs)
            else:
                log.exception("unexpected error writing %d demoted blocks (%s)", len(todo), pairs)
            self.counters.add(failed_transfers=len(todo))
            lost += [(h, -1) for _, h in todo]
            cause = "write_failed"
        finally:
            inflight.drop(job.hashes)  # after registration: the block is always findable somewhere
            # The snapshots are written (or given up) and out of the queue: their staging buffers are reused by
            # the next snapshots (no fresh memory, and its page faults, per demotion), after any reader is done.
            staging = lower.storage.staging
            if staging is not None:
                inflight.recycle(job.data, staging.give)
                staging.refill()  # here, on the writer: not on the next evicting thread
        if lost:
            self._drop([(h, s) for h, s in lost if not any(h in p for p in self.pools)], cause)
            # Still in memory or not, they did not reach the disk: what was written under them there must go.
            self._lost.extend(h for h, _ in lost)
        self.reap()
        if written:
            self.counters.add(demotions=written, bytes_demoted=written * self._block_bytes)
            for pair, n in Counter(job.pairs[i] for i, _ in todo).items():
                self.counters.pair(pair, n)
            self.demote_latency.observe(time.perf_counter() - job.queued_at)

    def _ancestors_on(self, disk: BlockPool, parents: Iterable[bytes | None]) -> set[bytes]:
        """The ancestors of blocks with these ``parents`` that ``disk`` holds, found by walking up the parents
        recorded in any tier or queue (a chain's head may be on disk while its middle is still in memory)."""
        out: set[bytes] = set()
        seen: set[bytes] = set()
        queues = list(self.inflight.values())
        for par in parents:
            x = par
            while x is not None and x not in seen:
                seen.add(x)
                if x in disk:
                    out.add(x)
                holder = next((p for p in self.pools if x in p), None)
                if holder is not None:
                    x = holder.parent_of(x)
                else:
                    x = next((q.parent(x) for q in queues if x in q), None)
        return out

    def _write_ancestors(self, disk: BlockPool, parents: Sequence[bytes | None], batch: AbstractSet[bytes]) -> int:
        """Copy to ``disk`` the ancestors of a batch that only memory tiers hold, root-most first, so that the
        batch's chains reach the disk. Returns how many were written."""
        memory = [p for p in self.pools if not p.storage.persistent]
        inflight = self.inflight.get(disk.tier)
        chain: list[tuple[BlockPool, bytes]] = []
        seen: set[bytes] = set()
        for par in parents:
            x = par
            while x is not None and x not in seen and x not in batch and x not in disk and (
                inflight is None or x not in inflight
            ):
                seen.add(x)
                holder = next((p for p in memory if x in p), None)
                if holder is None:
                    break  # lost everywhere: the batch's blocks under it are orphans
                chain.append((holder, x))
                x = holder.parent_of(x)
        if not chain:
            return 0
        # Each walk went child -> root; write root-most first, consecutive hashes of one pool in one copy.
        written = 0
        order = list(reversed(chain))
        i = 0
        while i < len(order):
            pool = order[i][0]
            j = i
            while j < len(order) and order[j][0] is pool:
                j += 1
            try:
                written += self.copy_down(pool, disk, [h for _, h in order[i:j]])
            except TieredKvError as exc:  # the batch's blocks under them are then refused and dropped as tails
                log.warning("writing %d ancestors to disk failed: %s", j - i, exc)
                self.counters.add(failed_transfers=j - i)
                break
            i = j
        return written

    # --------------------------------------------------------------------------------------------- writeback
    # Like an OS page cache (dirty_expire / dirty_writeback): every block registered in a memory tier is written to
    # the disk tier within writeback_s of its registration when the disk can take it, in registration order (a
    # parent is registered before its children, so it is written first or in the same transaction). The memory
    # copy stays: a later eviction of that block finds it on disk already and costs no write.
    #
    # A block is written once it has aged WB_AGE of writeback_s: blocks that churn through the memory tiers
    # faster than that reach the disk by demotion (the same one write) and the writeback never competes with
    # serving for them; what it writes is what stays in memory (a hot system prompt). The promise: seen by a pass
    # within WB_PERIOD, due WB_AGE later, written by the next pass (WB_PERIOD), after demotions for at most
    # WB_YIELD, which leaves 1 - 0.4 - 0.1 - 0.1 - 0.2 = 0.2 of writeback_s for the write itself.
    WB_AGE = 0.4
    WB_PERIOD = 0.1
    WB_YIELD = 0.2

    def _writeback_loop(self) -> None:
        assert self.writeback_s is not None
        period = max(0.01, self.writeback_s * self.WB_PERIOD)
        while not self._stop:
            if self.writeback_pending():
                self._wb_nudge.wait(period)  # something is ageing: look again in a period
            else:
                self._wb_kick.wait()  # idle: asleep until a registration, a waiter or stop()
            self._wb_kick.clear()
            self._wb_nudge.clear()
            if self._stop:
                return
            try:
                age = 0.0 if self._wb_urgent else self.writeback_s * self.WB_AGE
                self.writeback_now(age, yield_to_demotions=True)
            except TieredKvError as exc:
                if not self._stop:
                    log.warning("writeback failed: %s", exc)
            except Exception:
                log.exception("writeback failed")

    def writeback_now(self, min_age_s: float = 0.0, batch: int = 64, *, yield_to_demotions: bool = False) -> int:
        """Write every logged registration of the memory tiers that the disk tier lacks; returns blocks written.

        ``flush()`` and ``close()`` call it so that a graceful restart is as warm as the disk allows.
        ``min_age_s``: write only registrations a pass first saw at least that long ago (the rest wait).
        ``yield_to_demotions``: the background pass lets queued demotions go first, for at most ``WB_YIELD`` of
        ``writeback_s`` in all (a pass under steady load must still end, and keep the ``writeback_s`` promise).
        """
        disk = self._wb_disk
        if disk is None or not self._wb_pools or self.writeback_s is None:
            return 0
        written = 0
        with self._wb_lock:  # not a busy() section: drain() waits for demotions, flush() runs this itself
            now = time.monotonic()
            for p in self._wb_pools:
                self._wb_pending.extend((seq, now, p, h) for seq, h in p.take_registrations())
            self._wb_pending.sort(key=lambda e: e[0])
            # In sequence order the first-seen times only grow (retries keep theirs, and sort first): the due
            # entries are a leading run; the rest wait for a later pass.
            cut = now - min_age_s
            k = 0
            if min_age_s > 0:
                while k < len(self._wb_pending) and self._wb_pending[k][1] <= cut:
                    k += 1
            else:
                k = len(self._wb_pending)
            pending, later, self._wb_pending = self._wb_pending[:k], self._wb_pending[k:], []
            inflight = self.inflight.get(disk.tier)
            lowest_first = self._wb_pools[::-1]
            chosen: set[bytes] = set()
            i = 0
            # Demotions first, unless waiting longer would break the writeback_s promise: one budget per pass.
            due = time.monotonic() + (self.writeback_s or 0.0) * self.WB_YIELD
            while i < len(pending) and not self._stop:
                while yield_to_demotions and self.queue.depth and not self._stop:
                    left = due - time.monotonic()
                    if left <= 0 or self.queue.wait_idle(left):
                        break
                chunk = pending[i : i + batch]
                i += batch
                by_pool: dict[str, tuple[BlockPool, list[bytes]]] = {}
                for seq, seen, p, h in chunk:
                    if inflight is not None and h in inflight:
                        self._wb_pending.append((seq, seen, p, h))  # a demotion is writing it: look again later
                    elif h not in disk and h not in chosen:
                        # From the lowest memory tier that holds it: the copy holds the source blocks for the
                        # whole disk write, and a held top-tier block is room a serving allocation cannot take.
                        src = next((q for q in lowest_first if h in q), None)
                        if src is not None:
                            chosen.add(h)
                            by_pool.setdefault(src.tier, (src, []))[1].append(h)
                for p, hs in by_pool.values():
                    try:
                        n = self.copy_down(p, disk, hs)
                    except TieredKvError as exc:  # EIO, ENOSPC: the blocks stay in memory; eviction tries again
                        log.warning("writeback of %d blocks failed: %s", len(hs), exc)
                        self.counters.add(failed_transfers=len(hs))
                        continue
                    written += n
                    if n < len(hs):  # the disk could not take more now: retry later
                        missing = [h for h in hs if h not in disk]
                        self._wb_pending.extend((0, 0.0, p, h) for h in missing)
            if i < len(pending):
                self._wb_pending.extend(pending[i:])
            self._wb_pending.extend(later)
        self.reap()
        if written:
            self.counters.add(written_back=written)
        with self._wb_done:
            self._wb_done.notify_all()
        return written

    def writeback_pending(self) -> int:
        """Registrations the writeback has not written (or found on disk) yet."""
        with self._wb_lock:
            return len(self._wb_pending) + sum(p.logged_registrations() for p in self._wb_pools)

    def wait_for_writeback(self, timeout: float | None = None) -> bool:
        """Wait until the background writeback has caught up with every registration so far; False on timeout.

        Waits on the writeback's passes (each pass notifies), not on a clock.
        """
        if self.writeback_s is None or not self._wb_pools:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if not self.queue.drain(left):  # demotions on their way to the disk count as pending too
                return False
            with self._wb_done:
                if not self.writeback_pending():
                    return True
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._wb_urgent += 1  # the passes write young blocks too while someone waits
                self._wb_kick.set()
                self._wb_nudge.set()
                try:
                    self._wb_done.wait(left)
                finally:
                    self._wb_urgent -= 1

    # ---------------------------------------------------------------------------------------------- cleaning
    def _cleaner(self, upper: BlockPool, lower: BlockPool, kick: threading.Event) -> None:
        while not self._stop:
            # Asleep until an allocation leaves the tier below its low watermark (the pool's pressure hook) or
            # stop(); the timeout is only a safety net for room that appeared below without an allocation above.
            kick.wait(self.clean_interval)
            kick.clear()
            if self._stop:
                return
            with self.queue.busy():  # drain() waits for a cleaning pass in progress too
                try:
                    for _ in range(64):  # keep going while there is work, then sleep until kicked
                        if self._stop or self._clean(upper, lower) == 0:
                            break
                except TieredKvError as exc:
                    if not self._stop:
                        log.debug("cleaning %s failed: %s", upper.tier, exc)
                except Exception:  # keep the cleaner alive; the failure is logged
                    log.exception("cleaning %s -> %s failed", upper.tier, lower.tier)

    def run_cleaner_once(self, upper: BlockPool | None = None) -> int:
        """Clean ``upper`` (or every memory tier, top first) on this thread until a pass copies nothing.

        Returns how many blocks were copied down. The step hook behind
        :meth:`KvBlockManager.run_cleaner_once <tiered_kv.manager.KvBlockManager.run_cleaner_once>`.
        """
        copied = 0
        for up, low in itertools.pairwise(self.pools):
            if up.storage.persistent or (upper is not None and up is not upper):
                continue
            with self.queue.busy():
                for _ in range(64):
                    n = self._clean(up, low)
                    copied += n
                    if n == 0:
                        break
        return copied

    def alive_threads(self) -> int:
        """How many of the scheduler's threads (cleaners, writeback, writers, prefetch) are running."""
        threads = [*self._threads, *self.queue.threads()]
        return sum(t.is_alive() for t in threads)

    def _clean(self, upper: BlockPool, lower: BlockPool, budget: int | None = None) -> int:
        """Copy the policy's next victims down while they stay in place; returns how many were copied."""
        want = self._reserve(upper)
        inflight = self.inflight.get(lower.tier)
        upcoming = upper.eviction_candidates(want)
        dirty = [h for h in upcoming if h not in lower and (inflight is None or h not in inflight)]
        # Reserve = free slots + clean blocks among the next victims: evicting those costs no copy.
        reserve = upper.free_blocks() + len(upcoming) - len(dirty)
        n = budget if budget is not None else want - reserve
        candidates = dirty[: max(0, min(n, self.clean_batch))]
        candidates = candidates[: self._room_below(lower, len(candidates), set(upcoming))]
        if not candidates:
            return 0
        if inflight is not None and self.queue.depth >= self.queue.capacity:
            return 0  # bounded like eviction: never grow the disk backlog
        n_ok = self.copy_down(upper, lower, candidates)
        self.counters.add(cleaned=n_ok)
        return n_ok

    def copy_down(self, upper: BlockPool, lower: BlockPool, hashes: Sequence[bytes]) -> int:
        """Copy the blocks of ``hashes`` that ``upper`` holds into ``lower`` while they stay in ``upper``.

        The blocks are held during the copy (matchable, never evicted mid-copy); as many as ``lower`` has room
        for are copied, in one batch. Into a persistent tier, ancestors that only memory tiers hold go first.
        Returns how many blocks were registered below, those ancestors included.
        """
        with self._copy_locks[lower.tier]:
            idle = self._copies_idle.setdefault(upper.tier, threading.Event())
            idle.clear()
            todo = [h for h in hashes if h not in lower]
            try:
                return self._copy_down_locked(upper, lower, todo)
            except TieredKvError:
                if lower.storage.persistent:
                    self._lost.extend(todo)  # not written: what the disk holds under them must go (reap)
                raise
            finally:
                idle.set()

    def wait_for_copies(self, tier: str, timeout: float) -> None:
        """Wait (up to ``timeout``) until no copy holds blocks of ``tier``: a match sizing its room should not
        mistake blocks the cleaner holds for a moment for blocks other callers hold."""
        idle = self._copies_idle.get(tier)
        if idle is not None and not idle.is_set():
            idle.wait(timeout)

    def _copy_down_locked(self, upper: BlockPool, lower: BlockPool, hashes: Sequence[bytes]) -> int:
        held = upper.acquire(hashes)
        ancestors = 0  # written first, so that the batch's chains reach the disk: counted as written too
        try:
            protect: AbstractSet[bytes] | None = None
            if held and lower.storage.persistent:
                parents = upper.parents_of(held)
                # Ancestors that only memory tiers hold go first, so that the batch's chains reach the disk.
                ancestors = self._write_ancestors(lower, parents, {b.sequence_hash for b in held})
                # A nested ancestor write may have written blocks of this batch already (the ancestor of an
                # ancestor can lie in the batch): they are on disk now, and are not written twice.
                done = {i for i, b in enumerate(held) if b.sequence_hash in lower}
                if done:
                    upper.release_blocks([b for i, b in enumerate(held) if i in done], as_victims=True)
                    held = [b for i, b in enumerate(held) if i not in done]
                    parents = [p for i, p in enumerate(parents) if i not in done]
                # Only blocks whose chain reaches the disk go there (prefix-closed); the rest waits in ``upper``.
                refused = lower.refused([b.sequence_hash for b in held], parents)
                if refused:
                    upper.release_blocks([b for i, b in enumerate(held) if i in refused], as_victims=True)
                    held = [b for i, b in enumerate(held) if i not in refused]
                    parents = [p for i, p in enumerate(parents) if i not in refused]
                # Writing a chain's tail must not evict its own head there: what finds no other room is left.
                protect = self._ancestors_on(lower, parents)
            elif held:
                protect = self._dirty_victims(lower, len(held))  # clean room only: see _dirty_victims
            if not held:
                return ancestors
            dst = lower.allocate_up_to(len(held), protect)
            held_now = held[: len(dst)]
            if not dst:
                return ancestors
            # The sources stay held until their copies are registered below: the copy may borrow their slots.
            bad = set(self.copy(upper, held_now, lower, dst, borrow=True, count=False))
            good = [(b, d) for i, (b, d) in enumerate(zip(held_now, dst)) if i not in bad]
            lower.release_blocks([d for i, d in enumerate(dst) if i in bad])
            if good:
                toks = upper.tokens_of([b for b, _ in good])
                pars = upper.parents_of([b for b, _ in good])
                registered = lower.register_blocks(
                    [d for _, d in good], [b.sequence_hash for b, _ in good], toks, parents=pars
                )
                lower.release_blocks(registered)
            n_ok = len(good)
            self.counters.add(demotions=n_ok, bytes_demoted=n_ok * self._block_bytes)
            self.counters.pair(f"{upper.tier}->{lower.tier}", n_ok)
            return ancestors + n_ok
        finally:
            upper.release_blocks(held, as_victims=True)  # copied down, not used: they stay the next victims

    @staticmethod
    def _room_below(lower: BlockPool, n: int, upcoming: set[bytes]) -> int:
        """How many clean copies ``lower`` can take without evicting a copy that backs one of ``upcoming`` (the
        upper tier's next victims).

        Evicting such a copy would make that victim dirty again: cleaning would then chase its own tail. Lower
        copies of upper blocks that are not about to leave may go (their upper copy is the hot one).
        """
        room = lower.free_blocks()
        if room >= n:
            return n
        for h in lower.eviction_candidates(n - room):
            if h in upcoming:
                break
            room += 1
        return min(n, room)

    def _reserve(self, pool: BlockPool) -> int:
        """Free-or-clean blocks the cleaner keeps in ``pool`` (the low watermark)."""
        return max(1, int(pool.total_blocks() * self.low_watermark)) if self.low_watermark > 0 else 0

    # ---------------------------------------------------------------------------------------------- control
    def submit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the background prefetch worker (dropped silently once stopping)."""
        with self._lock:
            if self._stop or self._closing:
                return
            if self._prefetcher is None:
                self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="tiered-kv-prefetch")
            pool = self._prefetcher

        def run() -> None:
            try:
                fn()
            except TieredKvError as exc:  # a prefetch is advisory: a closed manager or a full tier is no error
                log.debug("prefetch skipped: %s", exc)
            except Exception:
                log.exception("prefetch failed")

        with self._prefetch_done:
            self._prefetches += 1
        try:
            pool.submit(run).add_done_callback(self._prefetch_finished)
        except RuntimeError:  # shut down meanwhile (close): nothing will run
            self._prefetch_finished(None)

    def _prefetch_finished(self, _: object) -> None:
        with self._prefetch_done:
            self._prefetches -= 1
            self._prefetch_done.notify_all()

    def wait_for_prefetches(self, timeout: float | None = None) -> bool:
        """Wait until every prefetch submitted so far has finished (or was cancelled); False on timeout."""
        with self._prefetch_done:
            return self._prefetch_done.wait_for(lambda: self._prefetches == 0, timeout)

    @property
    def max_queued_blocks(self) -> int:
        """Bound of the disk demotion queue, in blocks (settable)."""
        return self.queue.capacity

    @max_queued_blocks.setter
    def max_queued_blocks(self, n: int) -> None:
        self.queue.capacity = n

    def queue_depth(self) -> int:
        """Blocks waiting in (or being written from) the disk demotion queue."""
        return self.queue.depth

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until the demotion queue is empty, no write and no cleaning pass is in progress; False on timeout."""
        return self.queue.drain(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel prefetches, finish the writeback, drain the queue (up to ``timeout``), then stop every thread."""
        with self._lock:
            prefetcher, self._prefetcher = self._prefetcher, None
            self._closing = True  # no new prefetch
        if prefetcher is not None:
            prefetcher.shutdown(wait=True, cancel_futures=True)
        # What memory tiers registered recently reaches the disk before the threads stop (graceful restarts).
        try:
            self.writeback_now()
        except TieredKvError as exc:
            log.warning("writeback at close failed: %s", exc)
        with self._lock:
            self._stop = True  # cleaners and the writeback stop
        self._wb_kick.set()
        self._wb_nudge.set()
        for kick in self._kicks:
            kick.set()
        for t in self._threads:  # the cleaners first: they may still queue nothing, but they copy
            t.join(timeout)
        dropped = sum(len(j.hashes) for j in self.queue.stop(timeout))
        self.reap()  # what the last writes and evictions left unreachable, before the files close
        if dropped:
            self.counters.add(dropped_demotions=dropped)
            log.warning("close: %d queued demotions dropped after %.1f s", dropped, timeout)

    def metrics(self) -> dict[str, Any]:
        """Counters, queue depth and latency summaries."""
        c = self.counters
        with c.lock:
            out: dict[str, Any] = {
                "demotions": c.demotions,
                "promotions": c.promotions,
                "bytes_demoted": c.bytes_demoted,
                "bytes_promoted": c.bytes_promoted,
                "dropped_demotions": c.dropped_demotions,
                "failed_transfers": c.failed_transfers,
                "corrupt_blocks": c.corrupt_blocks,
                "cleaned": c.cleaned,
                "shared_promotions": c.shared_promotions,
                "written_back": c.written_back,
                "reaped": c.reaped,
                "drops_by_cause": dict(c.drops_by_cause),
                "per_pair": dict(c.per_pair),
            }
        out["queue_depth"] = self.queue_depth()
        out["demote_latency_s"] = self.demote_latency.summary()
        out["promote_latency_s"] = self.promote_latency.summary()
        return out


def release_all(blocks: Sequence[ImmutableBlock | Any]) -> None:
    """Release handles of any pool (or in-flight snapshots)."""
    for b in blocks:
        b.release()
