"""KvBlockManager: the tiers (device, host, disk, and optionally a shared Redis tier) behind one matching interface.

* Match: the hashes are looked up in the match sources (:mod:`tiered_kv.sources`) in order: device pool, host
  pool, the snapshots queued toward the disk, the disk pool, the remote tier; the match stops at the first hash no
  source holds. Runs found below the top tier are copied up (one batch per source, through
  :meth:`OffloadScheduler.copy <tiered_kv.offload.OffloadScheduler.copy>`) and registered in the top tier; the
  lower copy stays (tiers are inclusive). Concurrent matches of the same hashes share one promotion.
* Eviction: a memory tier's victims go down to the next tier before their slot is reused (copied at once between
  memory tiers, snapshotted and queued for a background writer toward the disk); cleaners copy ahead of need;
  with ``DiskConfig.writeback_s`` every registration reaches the disk within that time. Disk victims leave the
  hierarchy (or go to the remote tier in ``write_back`` mode), and their descendants with them (prefix-closed).
* The manager orchestrates; the offload scheduler (:mod:`tiered_kv.offload`) is the only code that moves bytes.

Lock order (never taken the other way round): a pool's register lock before its pool lock; pool locks top-down
(device -> host -> disk), since an eviction handler runs under the upper pool's lock and allocates below.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import msgpack

from ._gc import gc_paused
from .blocks import ImmutableBlock, MutableBlock
from .config import KvBlockManagerConfig
from .errors import (
    ConfigError,
    CorruptBlockError,
    InvalidBlockError,
    LayoutMismatchError,
    NotEnoughBlocksAvailable,
    ShutdownError,
)
from .events import EventBus, KvEvent
from .hashing import compute_sequence_hashes, hash_length
from .offload import OffloadScheduler
from .policies import create_policy
from .pool import BlockPool
from .sources import MatchSource
from .storage.memory import TensorArena
from .transfer import TransferStreams

if TYPE_CHECKING:
    from .peers import BlockDescriptor
    from .remote import RemotePoolView, RemoteTier
    from .sources import SnapshotBlock

__all__ = ["KvBlockManager", "UnclosedManagerWarning"]

log = logging.getLogger("tiered_kv")

#: Matches of at least this many hashes run with the cyclic GC paused (tiered_kv._gc): they may promote thousands
#: of blocks, each building short-lived handles, views and I/O ops that the collector would otherwise traverse.
GC_PAUSE_MIN_BLOCKS = 256

TIERS = ("device", "host", "disk")


class _Request:
    __slots__ = ("blocks", "num_tokens")

    def __init__(self, num_tokens: int, blocks: list[MutableBlock]) -> None:
        self.num_tokens = num_tokens
        self.blocks = blocks


class KvBlockManager:
    """Coordinates the configured tiers.

    Args:
        config: the tiers, model geometry, eviction policy and hashing parameters.
        disk_backend: a :class:`~tiered_kv.storage.disk.backend.DiskBackend` to use for the disk tier instead
            of the one ``config.disk.backend`` names (e.g. a ``FaultInjectingBackend`` for fault drills).
    """

    def __init__(self, config: KvBlockManagerConfig, *, disk_backend: Any = None) -> None:
        if not isinstance(config, KvBlockManagerConfig):
            raise TypeError(f"config must be a KvBlockManagerConfig, got {type(config).__name__}")
        self.config = config
        self.model = config.model
        self.device_type = config.resolved_device_type
        self._hash_length = hash_length(config.hash_algorithm)
        # Set by close() (or the drop finalizer); pools and workers see this flag, never the manager itself, so a
        # manager dropped without close() can be collected (its finalizer shuts it down by setting this flag).
        self._shutdown_flag = threading.Event()
        self._close_lock = threading.Lock()
        self._streams = TransferStreams(self.device_type)
        self.events = EventBus()
        self._requests: dict[Any, _Request] = {}
        self._requests_lock = threading.Lock()
        self._pools: dict[str, BlockPool] = {}
        #: Blocks the disk tier dropped at open because their chain was broken on disk (a crash between a parent's
        #: loss and its children's): no match could reach them.
        self.dropped_at_open: list[bytes] = []
        cuda = self.device_type == "cuda"
        try:
            if config.device is not None:
                arena = TensorArena(
                    "device", self.model, config.device.num_blocks, config.device.layout, self.device_type
                )
                self._add_pool("device", arena, config.device.num_blocks)
            if config.host is not None:
                arena = TensorArena(
                    "host", self.model, config.host.num_blocks, config.host.layout, "cpu", pin_memory=cuda
                )
                self._add_pool("host", arena, config.host.num_blocks)
            if config.disk is not None:
                self._open_disk(disk_backend)
        except BaseException:
            self._close_storages()
            raise
        self._order = [self._pools[t] for t in TIERS if t in self._pools]
        for pool in self._order:
            pool.events = self.events
        off = config.offload
        self.scheduler = OffloadScheduler(
            self._order,
            self._streams,
            writeback_s=config.disk.writeback_s if config.disk is not None else None,
            low_watermark=off.low_watermark,
            clean_batch=off.clean_batch,
            max_queued_blocks=off.max_queued_blocks,
            workers=off.writers,
            background_cleaning=off.background_cleaning,
        )
        # Lookup order for matches: each pool, with the snapshots queued toward a disk tier just above it; the
        # remote tier, when configured, last.
        self._sources: list[MatchSource] = self.scheduler.sources()
        self._remote: RemoteTier | None = None
        if config.remote is not None:
            try:
                self._open_remote(config)
            except BaseException:
                # Nothing may outlive a failed constructor: the scheduler's threads, the disk writer lock.
                self.scheduler.stop(timeout=10.0)
                self.events.close()
                self._close_storages()
                raise
        wid = config.worker_id
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}" if wid is None else str(wid)
        self._peers: dict[str, dict[str, Any]] = {}
        parts = (self.scheduler, self._pools, self.events, self._remote, self._shutdown_flag)
        self._finalizer = weakref.finalize(self, _close_dropped, repr(self), *parts)
        self._finalizer.atexit = False  # at interpreter exit, as before: daemon threads just end

    def _add_pool(self, tier: str, storage: Any, num_blocks: int) -> BlockPool:
        pool = BlockPool(
            tier, storage, create_policy(self.config.eviction, num_blocks), self._hash_length,
            closed=self._shutdown_flag.is_set,
        )
        self._pools[tier] = pool
        return pool

    def _open_disk(self, backend: Any) -> None:
        from .storage.disk_tier import open_disk_storage

        disk = self.config.disk
        assert disk is not None
        storage = open_disk_storage(self.config, backend)
        # A crash between a parent's loss and its children's (or an older version) can leave blocks that no match
        # reaches: drop them before the pool is rebuilt, so the tier starts prefix-closed.
        orphans = storage.store.orphans()
        self.dropped_at_open = orphans
        if orphans:
            log.warning("disk tier %s: dropping %d blocks whose chain is broken on disk", disk.path, len(orphans))
            storage.store.delete(orphans)
        pool = self._add_pool("disk", storage, disk.num_blocks)
        pool.restore(storage.stored_slots())

    def _open_remote(self, config: KvBlockManagerConfig) -> None:
        assert config.remote is not None
        try:
            from .remote import RemoteTier
        except ImportError as exc:  # redis-py is an optional dependency
            need = "the remote tier needs redis-py: pip install 'tiered_kv[remote]'"
            raise ConfigError("remote", config.remote, need) from exc
        remote = RemoteTier(config, config.remote)
        remote.max_fetch = self._order[0].total_blocks()
        self._remote = remote
        self._sources.append(remote)  # looked at last, below disk
        self.scheduler.attach_remote(remote, remote.mode)

    def remote(self) -> RemotePoolView | None:
        """The remote tier (match, contains, metrics), or None when not configured."""
        if self._remote is None:
            return None
        from .remote import RemotePoolView

        return RemotePoolView(self._remote)

    # --------------------------------------------------------------------------------------------- blocksets
    def export_local_blockset(self) -> bytes:
        """A msgpack description of this worker: id, fingerprint, namespace, tiers and the hashes each holds.

        Hashes are packed as one bytes string per tier (concatenated fixed-length hashes), so a blockset of a
        million blocks is about 32 MB with sha256 and 16 MB with xxh3_128.
        """
        doc = {
            "version": 1,
            "worker_id": self.worker_id,
            "fingerprint": self.model.fingerprint(),
            "namespace": self.config.namespace,
            "hash_algorithm": self.config.hash_algorithm,
            "hash_length": self._hash_length,
            "tiers": {p.tier: {"total_blocks": p.total_blocks(), "hashes": b"".join(p.cached_hashes())}
                      for p in self._order},
            "created": time.time(),
        }
        return msgpack.packb(doc, use_bin_type=True)

    def import_remote_blockset(self, data: bytes) -> str:
        """Remember what a peer worker holds (see :meth:`peer_holders`); returns the peer's worker id.

        Raises:
            LayoutMismatchError: the peer serves another model fingerprint, namespace or hash algorithm.
            ValueError: ``data`` is not a blockset.
        """
        try:
            doc = msgpack.unpackb(data, raw=False)
            peer = str(doc["worker_id"])
            theirs = (doc["fingerprint"], doc["namespace"], doc["hash_algorithm"])
            n = int(doc["hash_length"])
            tiers = {t: v["hashes"] for t, v in doc["tiers"].items()}
        except (ValueError, TypeError, KeyError, msgpack.ExtraData, msgpack.FormatError) as exc:
            raise ValueError(f"data: not a tiered_kv blockset ({exc})") from exc
        ours = (self.model.fingerprint(), self.config.namespace, self.config.hash_algorithm)
        if theirs != ours:
            raise LayoutMismatchError(
                f"blockset of worker {peer} is for (fingerprint, namespace, hash algorithm) {theirs}, "
                f"this manager serves {ours}"
            )
        held = {t: {blob[i : i + n] for i in range(0, len(blob), n)} for t, blob in tiers.items()}
        self._peers[peer] = held
        return peer

    def peer_holders(self, hashes: Sequence[bytes]) -> dict[str, int]:
        """For each imported peer, how long a prefix of ``hashes`` it holds (in any of its tiers)."""
        out = {}
        for peer, tiers in self._peers.items():
            allh = set().union(*tiers.values()) if tiers else set()
            n = 0
            while n < len(hashes) and hashes[n] in allh:
                n += 1
            out[peer] = n
        return out

    # ------------------------------------------------------------------------------------------------ accessors
    def device(self) -> BlockPool | None:
        """The device (GPU, or CPU without CUDA) pool, or None."""
        return self._pools.get("device")

    def host(self) -> BlockPool | None:
        """The host (pinned with CUDA) pool, or None."""
        return self._pools.get("host")

    def disk(self) -> BlockPool | None:
        """The NVMe pool, or None."""
        return self._pools.get("disk")

    def pools(self) -> list[BlockPool]:
        """The configured pools, top tier first."""
        return list(self._order)

    @property
    def top(self) -> BlockPool:
        """The top configured tier, where matches are returned."""
        return self._order[0]

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._closed

    # -------------------------------------------------------------------------------------------------- hashing
    def sequence_hashes(self, token_ids: Any, salt: str | bytes | None = None, extra_keys: Any = None) -> list[bytes]:
        """Hashes of the full blocks of ``token_ids`` with this manager's page size, algorithm and namespace."""
        # SequenceHash objects (each carries .parent); typed list[bytes] so callers' list[bytes] annotations hold.
        return cast(
            "list[bytes]",
            compute_sequence_hashes(
                token_ids,
                self.model.page_size,
                algorithm=self.config.hash_algorithm,
                namespace=self.config.namespace,
                salt=salt,
                extra_keys=extra_keys,
            ),
        )

    # ------------------------------------------------------------------------------------------------- matching
    def match_sequence_hashes(self, hashes: Sequence[bytes], tokens: Any = None) -> list[ImmutableBlock]:
        """The longest matched prefix of ``hashes``, as blocks of the top tier (promoted when found lower).

        Args:
            hashes: sequence hashes of a request's full blocks, in order.
            tokens: optionally the request's token ids; a block stored with other token ids is then a miss
                (a hash collision, accidental or crafted, never returns someone else's KV).

        Raises:
            ShutdownError: the manager is closed.
            ValueError: a hash has the wrong type or length.
        """
        self._check_open()
        try:
            n = len(hashes)
        except TypeError:
            n = 0  # validate_hashes refuses it below
        if n < GC_PAUSE_MIN_BLOCKS:
            return self._match(hashes, tokens)
        with gc_paused():  # a long prefix builds a few short-lived objects per block: see tiered_kv._gc
            return self._match(hashes, tokens)

    def _match(self, sequence_hashes: Sequence[bytes], tokens: Any) -> list[ImmutableBlock]:
        self.scheduler.reap()  # descendants of blocks that left every tier go before they can be looked up
        top = self._order[0]
        hashes = top.validate_hashes(sequence_hashes, "hashes")
        expected = top.expected_tokens(tokens, len(hashes))
        for _attempt in range(4):
            segments = self._find(hashes, expected)
            if len(self._sources) == 1 or all(ti == 0 for ti, _ in segments):
                return [b for _, run in segments for b in run]
            lower = [b.sequence_hash for ti, run in segments if ti for b in run]
            mine, theirs = self.scheduler.claims.claim(lower)
            if theirs or any(h in top for h in lower):
                # Another caller is promoting some of these (or just did): wait for it and match again; its copy
                # is ours too.
                self.scheduler.claims.done(mine)
                for _, run in segments:
                    for b in run:
                        b.release()
                for ev in theirs:
                    ev.wait(5.0)
                self.scheduler.counters.add(shared_promotions=len(lower) - len(mine))
                continue
            try:
                return self._promote(segments)
            finally:
                self.scheduler.claims.done(mine)
        # Still contended after several rounds: return the top tier's leading run, promote nothing.
        segments = self._find(hashes, expected)
        out: list[ImmutableBlock] = []
        if segments and segments[0][0] == 0:
            out = list(segments[0][1])
            segments = segments[1:]
        for _, run in segments:
            for b in run:
                b.release()
        return out

    async def match_sequence_hashes_async(self, hashes: Sequence[bytes], tokens: Any = None) -> list[ImmutableBlock]:
        """Async twin of :meth:`match_sequence_hashes`; copies run in a worker thread, not on the event loop."""
        return await asyncio.to_thread(self.match_sequence_hashes, hashes, tokens)

    def _find(self, hashes: list[bytes], expected: list[bytes] | None = None) -> list[tuple[int, list[Any]]]:
        """Per hash, the highest source holding it; consecutive hashes of one source form a run.

        Returns ``(source index, handles)`` runs; index 0 is the top pool.
        """
        pools = self._sources
        segments: list[tuple[int, list[Any]]] = []
        pos = 0
        n = len(hashes)
        while pos < n:
            h = hashes[pos]
            for ti, pool in enumerate(pools):
                if pool.may_hold(h):
                    higher = pools[:ti]
                    run = pool.match_run(hashes, pos, higher, expected)
                    if run:
                        for miss in higher:
                            if isinstance(miss, BlockPool):
                                miss.metrics.misses += 1
                        segments.append((ti, run))
                        pos += len(run)
                        break
            else:
                for pool in pools:
                    if isinstance(pool, BlockPool):
                        pool.metrics.misses += 1
                break
        return segments

    @staticmethod
    def _prefix_that_fits(items: list[tuple[int, Any]], room: int) -> int:
        """How many leading items of a match the top tier can hold given ``room`` free or evictable slots.

        A prefix of k items fits when its lower-tier blocks fit in the room plus the top-tier blocks beyond it
        (released before we allocate); a top block inside the prefix stays held. Longer prefixes only shrink the
        slack, so take items while it stays non-negative.
        """
        top_beyond = sum(1 for ti, _ in items if ti == 0)
        keep, lower = 0, 0
        for ti, _ in items:
            if ti:
                lower += 1
            else:
                top_beyond -= 1
            if lower > room + top_beyond:
                break
            keep += 1
        return keep

    def _promote(self, segments: list[tuple[int, list[Any]]]) -> list[ImmutableBlock]:
        """Copy lower-tier runs into the top tier, one batch per source tier; truncate to what the top can hold."""
        t0 = time.perf_counter()
        top = self._order[0]
        items = [(ti, b) for ti, run in segments for b in run]
        dst: list[MutableBlock] = []
        result: list[ImmutableBlock | None] = []
        try:
            # The longest prefix the top tier can hold: its lower-tier blocks need slots, which may come from
            # free or evictable blocks, including top-tier blocks of this match that lie beyond the prefix.
            keep = self._prefix_that_fits(items, top.available_blocks())
            if keep < len(items):
                # A copy (cleaning, writeback) may hold top blocks for a moment, so they do not count as room:
                # wait for it only when the match would otherwise be cut, never when it fits already.
                self.scheduler.wait_for_copies(top.tier, 0.2)
                keep = self._prefix_that_fits(items, top.available_blocks())
            for _, b in items[keep:]:
                b.release()  # beyond the prefix: make them evictable before we allocate (and demote)
            lower = sum(1 for ti, _ in items[:keep] if ti)
            dst = top.allocate_up_to(lower)
            if len(dst) < lower:
                # A cleaning copy may have taken hold of top blocks since we sized the room: it ends soon.
                self.scheduler.wait_for_copies(top.tier, 0.2)
                dst += top.allocate_up_to(lower - len(dst))
            if len(dst) < lower:  # raced with other callers: shorten the prefix to the slots we got
                covered = 0
                for pos, (ti, _) in enumerate(items[:keep]):
                    if ti:
                        if covered == len(dst):
                            keep = pos
                            break
                        covered += 1
                for _, b in items[keep:]:
                    b.release()
            result = [b if ti == 0 else None for ti, b in items[:keep]]
            plan: dict[int, list[tuple[int, Any]]] = {}
            for pos, (ti, b) in enumerate(items[:keep]):
                if ti:
                    plan.setdefault(ti, []).append((pos, b))
            cut = keep
            d = 0
            for ti, entries in sorted(plan.items()):
                targets = dst[d : d + len(entries)]
                d += len(entries)
                src = self._sources[ti]
                # Blocks failing verification are counted (once) by the source pool, which drops them.
                bad = self.scheduler.copy(src, [b for _, b in entries], top, targets, count=False)
                if bad:
                    cut = min(cut, min(entries[i][0] for i in bad))
                toks = src.tokens_of([b for _, b in entries])
                pars = src.parents_of([b for _, b in entries])
                good = [(p, t, b.sequence_hash, k, q)
                        for ((p, b), t, k, q) in zip(entries, targets, toks, pars) if p < cut]
                top.release_blocks([t for (p, _), t in zip(entries, targets) if p >= cut])
                if good:
                    registered = top.register_blocks(
                        [g[1] for g in good], [g[2] for g in good], [g[3] for g in good], parents=[g[4] for g in good]
                    )
                    for g, r in zip(good, registered):
                        result[g[0]] = r
                    n = len(good)
                    self.scheduler.counters.add(promotions=n, bytes_promoted=n * self.model.block_size_bytes)
                    self.scheduler.counters.pair(f"{src.tier}->{top.tier}", n)
            top.release_blocks(dst[d:])
            out = [b for b in result[:cut] if b is not None]
            top.release_blocks([b for b in result[cut:] if b is not None])
            for ti, run in segments:
                if ti:
                    self._sources[ti].release_blocks(run)
            self.scheduler.promote_latency.observe(time.perf_counter() - t0)
            return out
        except BaseException:
            for _, b in items:
                b.release()
            top.release_blocks(dst)
            top.release_blocks([b for b in result if b is not None])
            raise

    # ---------------------------------------------------------------------------------------- explicit transfers
    def swap_out(self, blocks: Sequence[ImmutableBlock]) -> list[ImmutableBlock]:
        """Copy device blocks to the host tier (e.g. to preempt a request) and return host handles.

        The device blocks stay registered and held by the caller (release them to let the device reuse them).
        Blocks already on the host are not copied again. All or nothing: if the host cannot take every block,
        ``NotEnoughBlocksAvailable`` is raised and nothing is copied.
        """
        return self._move(blocks, "device", "host")

    def swap_in(self, blocks: Sequence[ImmutableBlock]) -> list[ImmutableBlock]:
        """Copy host blocks back to the device tier and return device handles (all or nothing)."""
        return self._move(blocks, "host", "device")

    async def swap_out_async(self, blocks: Sequence[ImmutableBlock]) -> list[ImmutableBlock]:
        """Async twin of :meth:`swap_out` (the copy runs in a worker thread)."""
        return await asyncio.to_thread(self.swap_out, blocks)

    async def swap_in_async(self, blocks: Sequence[ImmutableBlock]) -> list[ImmutableBlock]:
        """Async twin of :meth:`swap_in` (the copy runs in a worker thread)."""
        return await asyncio.to_thread(self.swap_in, blocks)

    def _move(self, blocks: Sequence[ImmutableBlock], src_tier: str, dst_tier: str) -> list[ImmutableBlock]:
        self._check_open()
        src, dst = self._pools.get(src_tier), self._pools.get(dst_tier)
        if src is None or dst is None:
            raise ValueError(f"swapping {src_tier} -> {dst_tier} needs both tiers configured")
        blocks = list(blocks)
        for i, b in enumerate(blocks):
            if not isinstance(b, ImmutableBlock) or b.pool is not src or b.released:
                raise InvalidBlockError(
                    f"blocks[{i}]: expected a held ImmutableBlock of the {src_tier} pool, got {b!r}"
                )
        present = dst.acquire([b.sequence_hash for b in blocks])
        have = {b.sequence_hash: b for b in present}
        todo = [b for b in blocks if b.sequence_hash not in have]
        try:
            new = dst.allocate_blocks(len(todo))
        except NotEnoughBlocksAvailable:
            dst.release_blocks(present)
            raise
        try:
            bad = self.scheduler.copy(src, todo, dst, new, count=False)
            if bad:
                raise CorruptBlockError(f"{len(bad)} {src_tier} blocks failed verification while swapping")
            registered = dst.register_blocks(
                new, [b.sequence_hash for b in todo], src.tokens_of(todo), parents=src.parents_of(todo)
            )
        except BaseException:
            dst.release_blocks([*new, *present])
            raise
        n = len(todo)
        self.scheduler.counters.pair(f"{src_tier}->{dst_tier}", n)
        for b, r in zip(todo, registered):
            have[b.sequence_hash] = r
        return [have[b.sequence_hash] for b in blocks]

    def copy_blocks(self, src_blocks: Sequence[Any], dst_blocks: Sequence[MutableBlock]) -> None:
        """Byte copy between blocks of the same geometry, within or across tiers, in one batch per pool pair.

        Args:
            src_blocks: held blocks (mutable or immutable) of any tier.
            dst_blocks: mutable blocks of any tier, one per source block.

        Raises:
            ValueError: lengths differ. InvalidBlockError: a released or foreign block.
            CorruptBlockError: a disk source failed verification (its destination is not written).
        """
        self._check_open()
        src_blocks, dst_blocks = list(src_blocks), list(dst_blocks)
        if len(src_blocks) != len(dst_blocks):
            raise ValueError(f"src_blocks and dst_blocks differ in length: {len(src_blocks)} != {len(dst_blocks)}")
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (s, d) in enumerate(zip(src_blocks, dst_blocks)):
            if s.released or s.pool not in self._order:
                raise InvalidBlockError(f"src_blocks[{i}]: {s!r} is released or not from this manager")
            if not isinstance(d, MutableBlock) or d.released or d.pool not in self._order:
                raise InvalidBlockError(f"dst_blocks[{i}]: expected a live MutableBlock of this manager, got {d!r}")
            groups.setdefault((id(s.pool), id(d.pool)), []).append(i)
        for idx in groups.values():
            s_pool, d_pool = src_blocks[idx[0]].pool, dst_blocks[idx[0]].pool
            bad = self.scheduler.copy(s_pool, [src_blocks[i] for i in idx], d_pool, [dst_blocks[i] for i in idx])
            if bad:
                raise CorruptBlockError(f"{len(bad)} source blocks failed verification in copy_blocks")

    def prefetch(self, hashes: Sequence[bytes], tokens: Any = None) -> None:
        """Start promoting what the lower tiers hold of ``hashes`` toward the top tier; returns at once.

        A later match finds the blocks promoted, or waits for the promotion in flight (never fetched twice).
        Pending prefetches are cancelled by :meth:`close`.
        """
        self._check_open()
        hashes = self._order[0].validate_hashes(hashes, "hashes")
        self.scheduler.submit(lambda: self.top.release_blocks(self.match_sequence_hashes(hashes, tokens)))

    def wait_for_prefetches(self, timeout: float | None = None) -> bool:
        """Wait until every :meth:`prefetch` issued so far has finished; False on timeout."""
        return self.scheduler.wait_for_prefetches(timeout)

    # ------------------------------------------------------------------------------------------ reset and touch
    def reset(self, tiers: Sequence[str] | None = None) -> None:
        """Drop every inactive cached block of the given tiers (all by default; disk rows in one transaction).

        Raises:
            InvalidBlockError: a block of one of these tiers is held or pinned; nothing is dropped anywhere.
        """
        self._check_open()
        names = list(self._pools) if tiers is None else list(tiers)
        pools = [self._pool_named(t) for t in names]
        self.scheduler.drain()
        for pool in pools:
            held = pool.held_blocks()
            if held:
                raise InvalidBlockError(f"cannot reset: {held} blocks of the {pool.tier} tier are held or pinned")
        for pool in pools:
            self.scheduler.drop_queued(pool.tier)
            pool.reset()

    # -------------------------------------------------------------------------------------------------- metrics
    def metrics(self) -> dict[str, Any]:
        """One entry per configured tier (``pool.stats()``: total_blocks, available_blocks, hits, misses, hit_rate,
        evictions, ...), ``"offload"`` (the scheduler's counters, corrupt_blocks summed over every tier) and
        ``"remote"`` when that tier is configured."""
        out: dict[str, Any] = {}
        for tier, pool in self._pools.items():
            out[tier] = pool.stats()
        off = self.scheduler.metrics()
        off["corrupt_blocks"] += sum(p.metrics.corrupt for p in self._pools.values())
        out["offload"] = off
        if self._remote is not None:
            out["remote"] = self._remote.metrics()
            off["corrupt_blocks"] += out["remote"]["store"].get("corrupt", 0)
        return out

    # ------------------------------------------------------------------------------------------ events, pressure
    def subscribe(self, callback: Callable[[KvEvent], None]) -> Callable[[], None]:
        """Receive a :class:`~tiered_kv.events.KvEvent` for every block stored in or removed from any tier.

        Callbacks run on a dispatcher thread, never under a pool lock. Returns an unsubscribe function.
        """
        return self.events.subscribe(callback)

    def on_memory_pressure(
        self, callback: Callable[[str, float], None], threshold: float = 0.9, tier: str | None = None
    ) -> None:
        """Call ``callback(tier, usage_rate)`` whenever the tier's usage rises to ``threshold`` (top tier default).

        Edge-triggered: it fires again only after usage has fallen below the threshold in between.
        """
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
        pool = self._pool_named(tier)
        self.events.watch(pool, threshold, callback)

    # ----------------------------------------------------------------------------------------------- step hooks
    def run_cleaner_once(self, tier: str | None = None) -> int:
        """Run the cleaner now, on this thread, until it finds nothing more to copy; returns blocks copied down.

        With ``OffloadConfig(background_cleaning=False)`` this is the only way cleaning happens: tests and
        simulations step it deterministically. ``tier``: one memory tier ("device", "host"), or every one.
        """
        self._check_open()
        return self.scheduler.run_cleaner_once(None if tier is None else self._pool_named(tier))

    def deliver_events_now(self) -> None:
        """Deliver every KV event published so far and run the memory-pressure checks, on this thread."""
        self._check_open()
        self.events.deliver_now()

    def trigger_eviction(self, mode: str = "normal", tier: str | None = None) -> int:
        """Evict inactive blocks of one tier (the top by default) now; victims are demoted as usual.

        ``mode``: an :class:`~tiered_kv.enums.EvictionMode` or its string; see :meth:`BlockPool.trigger_eviction`.
        Returns how many blocks were evicted.
        """
        self._check_open()
        return self._pool_named(tier).trigger_eviction(mode)

    def _pool_named(self, tier: str | None) -> BlockPool:
        if tier is None:
            return self._order[0]
        pool = self._pools.get(tier)
        if pool is None:
            raise ValueError(f"tier must be one of {', '.join(self._pools)}, got {tier!r}")
        return pool

    # ----------------------------------------------------------------------------------------- request-level API
    def can_allocate(self, num_tokens: int) -> bool:
        """Whether the top tier could give the blocks for ``num_tokens`` tokens right now."""
        return self._blocks_for(num_tokens) <= self._order[0].available_blocks()

    def allocate_for_request(self, request_id: Any, num_tokens: int) -> list[int]:
        """Allocate top-tier blocks for ``num_tokens`` tokens of a new request; returns its block table.

        Raises:
            ValueError: the request id is already allocated, or ``num_tokens`` is negative.
            NotEnoughBlocksAvailable: the top tier cannot hold it (nothing allocated).
        """
        self._check_open()
        n = self._blocks_for(num_tokens)
        with self._requests_lock:
            if request_id in self._requests:
                raise ValueError(f"request_id {request_id!r} is already allocated")
            blocks = self._order[0].allocate_blocks(n)
            self._requests[request_id] = _Request(num_tokens, blocks)
            return [b.block_id for b in blocks]

    def extend(self, request_id: Any, num_tokens: int) -> list[int]:
        """Grow a request by ``num_tokens`` tokens, allocating blocks as needed; returns the new block ids."""
        self._check_open()
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
            raise ValueError(f"num_tokens must be a non-negative int, got {num_tokens!r}")
        with self._requests_lock:
            req = self._request(request_id)
            need = self._blocks_for(req.num_tokens + num_tokens) - len(req.blocks)
            new = self._order[0].allocate_blocks(need) if need > 0 else []
            req.blocks.extend(new)
            req.num_tokens += num_tokens
            return [b.block_id for b in new]

    def get_block_table(self, request_id: Any) -> list[int]:
        """The request's block ids in the top tier, in token order."""
        with self._requests_lock:
            return [b.block_id for b in self._request(request_id).blocks]

    def request_blocks(self, request_id: Any) -> list[MutableBlock]:
        """The request's mutable blocks (to fill them, or to register the full ones)."""
        with self._requests_lock:
            return list(self._request(request_id).blocks)

    def free_request(self, request_id: Any) -> None:
        """Release every block of the request; unknown ids raise KeyError."""
        with self._requests_lock:
            req = self._requests.pop(request_id, None)
        if req is None:
            raise KeyError(f"unknown request_id {request_id!r}")
        for b in req.blocks:
            b.release()

    def _request(self, request_id: Any) -> _Request:
        req = self._requests.get(request_id)
        if req is None:
            raise KeyError(f"unknown request_id {request_id!r}")
        return req

    def _blocks_for(self, num_tokens: int) -> int:
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
            raise ValueError(f"num_tokens must be a non-negative int, got {num_tokens!r}")
        return math.ceil(num_tokens / self.model.page_size)

    # ------------------------------------------------------------------------------------------------ lifecycle
    def flush(self) -> None:
        """Wait until queued demotions and the pending writeback are done and disk writes are durable."""
        self._check_open()
        self.scheduler.drain()
        self.scheduler.writeback_now()  # registrations not yet written back (DiskConfig.writeback_s)
        self.scheduler.drain()
        self.scheduler.reap()  # descendants of blocks that left every tier
        self.sync_disk()
        if self._remote is not None:
            self._remote.drain()

    def sync_disk(self) -> None:
        """Make every block the disk tier holds now durable (commit its registry, sync its files).

        Cheaper than :meth:`flush`: it neither waits for queued demotions nor writes the memory tiers back, so
        a caller can checkpoint often ("what is on disk now survives a crash") without stalling the movers.
        No-op without a disk tier.
        """
        self._check_open()
        disk = self._pools.get("disk")
        if disk is not None:
            disk.storage.flush()  # type: ignore[attr-defined]

    def persist(self) -> int:
        """Copy every block of the memory tiers that the disk tier lacks down to disk, then flush.

        Demotion is write-back (on eviction), so without this what sits in the device and host tiers at exit is
        gone for the next process. Blocks stay where they are; the disk tier's own policy makes room (it may
        evict its coldest blocks). Returns how many blocks were written.
        """
        self._check_open()
        disk = self._pools.get("disk")
        if disk is None:
            return 0
        self.scheduler.drain()
        written = 0
        for pool in self._order:
            if pool is disk:
                continue
            todo = [h for h in pool.cached_hashes() if h not in disk]
            for i in range(0, len(todo), 256):
                written += self.scheduler.copy_down(pool, disk, todo[i : i + 256])
        self.flush()
        return written

    def close(self) -> None:
        """Flush, stop background work and close files; idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._finalizer.detach()
            _close_parts(self.scheduler, self._pools, self.events, self._remote, self._shutdown_flag)

    def _close_storages(self) -> None:
        _close_storages(self._pools)

    def __enter__(self) -> KvBlockManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ShutdownError("the KvBlockManager is closed")

    def __repr__(self) -> str:
        tiers = ", ".join(f"{p.tier}={p.total_blocks()}" for p in self._order)
        return f"KvBlockManager({tiers}, device_type={self.device_type!r})"

    @property
    def _closed(self) -> bool:
        return self._shutdown_flag.is_set()

    # -------------------------------------------------------------------- remote block access (by descriptor)
    def export_block_descriptors(self, blocks: Sequence[ImmutableBlock | bytes]) -> list[BlockDescriptor]:
        """Publish blocks this manager holds to the remote tier now and describe them for peers.

        Args:
            blocks: held handles, or hashes registered in any local tier.

        Returns:
            One :class:`~tiered_kv.peers.BlockDescriptor` per block (``BlockDescriptor.pack_many`` to send them).

        Raises:
            ConfigError: no remote tier. InvalidBlockError: a block no local tier holds.
            BlockPoolError: the remote tier did not take every block.
        """
        from .peers import publish_blocks

        self._check_open()
        return publish_blocks(self, blocks)

    def get_remote_blocks_immutable(self, block_descriptors: Sequence[BlockDescriptor]) -> list[SnapshotBlock]:
        """Read-only handles of peers' published blocks, fetched and verified from the remote tier; all or nothing.

        The handles hold the bytes (``layer_view`` returns copies) and take no local slot.

        Raises:
            ConfigError: no remote tier. LayoutMismatchError: a descriptor of another model or namespace.
            InvalidBlockError: a block the remote tier does not hold (nothing is returned).
        """
        from .peers import remote_blocks_immutable

        self._check_open()
        return remote_blocks_immutable(self, block_descriptors)

    def get_remote_blocks_mutable(self, block_descriptors: Sequence[BlockDescriptor]) -> list[MutableBlock]:
        """Peers' published blocks copied into new blocks of the top tier (to modify, then register); all or nothing.

        Raises:
            As :meth:`get_remote_blocks_immutable`, and NotEnoughBlocksAvailable when the top tier lacks room.
        """
        from .peers import remote_blocks_mutable

        self._check_open()
        return remote_blocks_mutable(self, block_descriptors)


class UnclosedManagerWarning(ResourceWarning):
    """A :class:`KvBlockManager` was garbage-collected without ``close()``; it was closed then."""


def _close_parts(
    scheduler: OffloadScheduler,
    pools: dict[str, BlockPool],
    events: EventBus,
    remote: RemoteTier | None,
    flag: threading.Event,
) -> None:
    """Flush, stop background work and close files: ``close()``'s work, shared with the drop finalizer."""
    try:
        scheduler.stop(timeout=10.0)
        disk = pools.get("disk")
        if disk is not None:
            disk.storage.flush()  # type: ignore[attr-defined]
    finally:
        flag.set()  # from here on every call raises ShutdownError
        events.close()
        if remote is not None:
            remote.close()
        _close_storages(pools)


def _close_storages(pools: dict[str, BlockPool]) -> None:
    for pool in pools.values():
        try:
            pool.storage.close()
        except Exception:
            log.exception("closing the %s tier failed", pool.tier)


def _close_dropped(description: str, *parts: Any) -> None:
    """Finalizer of a manager dropped without ``close()``: warn, then close what it left running."""
    warnings.warn(
        f"{description} was garbage-collected without close(); closing it now", UnclosedManagerWarning, stacklevel=2
    )
    if threading.current_thread().name.startswith("tiered-kv"):
        # The last reference went away on one of the manager's own threads (a prefetch job): a thread cannot join
        # itself, so the shutdown runs on a thread of its own.
        threading.Thread(target=_close_parts, args=parts, name="tiered-kv-close", daemon=True).start()
    else:
        _close_parts(*parts)
