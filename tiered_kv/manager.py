"""KvBlockManager: the tiers (device, host, disk) behind one matching interface.

Match looks for each hash in order in the device pool, then host, then disk, and stops at the first miss. Blocks
found below the top tier are copied up (one batch per source tier) and registered in the top tier; the lower copy
stays (tiers are inclusive). When a tier evicts, its victims are copied down to the next tier before their slot is
reused (write-back); disk victims are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from typing import Any

from .blocks import ImmutableBlock, MutableBlock
from .config import KvBlockManagerConfig
from .errors import NotEnoughBlocksAvailable, ShutdownError
from .hashing import compute_sequence_hashes, hash_length
from .policies import create_policy
from .pool import BlockPool
from .storage.memory import TensorArena
from .transfer import TransferStreams, copy_between

__all__ = ["KvBlockManager"]

log = logging.getLogger("tiered_kv")

TIERS = ("device", "host", "disk")


class _OffloadCounters:
    __slots__ = (
        "bytes_demoted",
        "bytes_promoted",
        "corrupt_blocks",
        "demotions",
        "dropped_demotions",
        "failed_transfers",
        "promotions",
    )

    def __init__(self) -> None:
        self.demotions = 0
        self.promotions = 0
        self.bytes_demoted = 0
        self.bytes_promoted = 0
        self.corrupt_blocks = 0
        self.failed_transfers = 0
        self.dropped_demotions = 0


class KvBlockManager:
    """Coordinates the configured tiers.

    Args:
        config: the tiers, model geometry, eviction policy and hashing parameters.
    """

    def __init__(self, config: KvBlockManagerConfig) -> None:
        if not isinstance(config, KvBlockManagerConfig):
            raise TypeError(f"config must be a KvBlockManagerConfig, got {type(config).__name__}")
        self.config = config
        self.model = config.model
        self.device_type = config.resolved_device_type
        self._hash_length = hash_length(config.hash_algorithm)
        self._closed = False
        self._close_lock = threading.Lock()
        self._streams = TransferStreams(self.device_type)
        self._counters = _OffloadCounters()
        self._counter_lock = threading.Lock()
        self._pools: dict[str, BlockPool] = {}
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
                self._open_disk()
        except BaseException:
            self._close_storages()
            raise
        self._order = [self._pools[t] for t in TIERS if t in self._pools]
        for upper, lower in zip(self._order, self._order[1:]):
            upper.set_eviction_handler(self._make_demoter(upper, lower))

    def _add_pool(self, tier: str, storage: Any, num_blocks: int) -> BlockPool:
        pool = BlockPool(tier, storage, create_policy(self.config.eviction, num_blocks), self._hash_length)
        pool._closed = lambda: self._closed
        self._pools[tier] = pool
        return pool

    def _open_disk(self) -> None:
        from .storage.disk_tier import open_disk_storage

        disk = self.config.disk
        assert disk is not None
        storage = open_disk_storage(self.config)
        pool = self._add_pool("disk", storage, disk.num_blocks)
        pool._restore(storage.stored_slots())

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
        return compute_sequence_hashes(
            token_ids,
            self.model.page_size,
            algorithm=self.config.hash_algorithm,
            namespace=self.config.namespace,
            salt=salt,
            extra_keys=extra_keys,
        )

    # ------------------------------------------------------------------------------------------------- matching
    def match_sequence_hashes(self, hashes: Sequence[bytes]) -> list[ImmutableBlock]:
        """The longest matched prefix of ``hashes``, as blocks of the top tier (promoted when found lower).

        Raises:
            ShutdownError: the manager is closed.
            ValueError: a hash has the wrong type or length.
        """
        self._check_open()
        top = self._order[0]
        hashes = top._validate_hashes(hashes, "hashes")
        segments = self._find(hashes)
        if len(self._order) == 1 or all(tier == 0 for tier, _ in segments):
            return [b for _, run in segments for b in run]
        return self._promote(segments)

    async def match_sequence_hashes_async(self, hashes: Sequence[bytes]) -> list[ImmutableBlock]:
        """Async twin of :meth:`match_sequence_hashes`; copies run in a worker thread, not on the event loop."""
        return await asyncio.to_thread(self.match_sequence_hashes, hashes)

    def _find(self, hashes: list[bytes]) -> list[tuple[int, list[ImmutableBlock]]]:
        """Per hash, the highest tier holding it; consecutive hashes of one tier form a run."""
        pools = self._order
        segments: list[tuple[int, list[ImmutableBlock]]] = []
        pos = 0
        n = len(hashes)
        while pos < n:
            h = hashes[pos]
            for ti, pool in enumerate(pools):
                if h in pool:
                    higher = pools[:ti]
                    run = pool._match_run(hashes, pos, higher)
                    if run:
                        for miss in higher:
                            miss.metrics.misses += 1
                        segments.append((ti, run))
                        pos += len(run)
                        break
            else:
                for pool in pools:
                    pool.metrics.misses += 1
                break
        return segments

    def _promote(self, segments: list[tuple[int, list[ImmutableBlock]]]) -> list[ImmutableBlock]:
        """Copy lower-tier runs into the top tier, one batch per source tier; truncate to what the top can hold."""
        top = self._order[0]
        items = [(ti, b) for ti, run in segments for b in run]
        dst: list[MutableBlock] = []
        result: list[ImmutableBlock | None] = []
        try:
            # The longest prefix the top tier can hold: its lower-tier blocks need slots, which may come from
            # free or evictable blocks, including top-tier blocks of this match that lie beyond the prefix.
            room = top.available_blocks()
            top_after = sum(1 for ti, _ in items if ti == 0)
            keep, lower = 0, 0
            for ti, _ in items:
                if ti:
                    if lower + 1 > room + top_after:
                        break
                    lower += 1
                else:
                    top_after -= 1
                keep += 1
            for _, b in items[keep:]:
                b.release()  # beyond the prefix: make them evictable before we allocate (and demote)
            dst = self._allocate_up_to(top, lower)
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
            plan: dict[int, list[tuple[int, ImmutableBlock]]] = {}
            for pos, (ti, b) in enumerate(items[:keep]):
                if ti:
                    plan.setdefault(ti, []).append((pos, b))
            cut = keep
            d = 0
            for ti, entries in sorted(plan.items()):
                targets = dst[d : d + len(entries)]
                d += len(entries)
                bad = copy_between(self._order[ti], [b for _, b in entries], top, targets, self._streams)
                if bad:
                    cut = min(cut, min(entries[i][0] for i in bad))
                good = [(p, t, b.sequence_hash) for (p, b), t in zip(entries, targets) if p < cut]
                top.release_blocks([t for (p, _), t in zip(entries, targets) if p >= cut])
                if good:
                    registered = top.register_blocks([t for _, t, _ in good], [h for _, _, h in good])
                    for (p, _, _), r in zip(good, registered):
                        result[p] = r
                    with self._counter_lock:
                        self._counters.promotions += len(good)
                        self._counters.bytes_promoted += len(good) * self.model.block_size_bytes
            top.release_blocks(dst[d:])
            out = [b for b in result[:cut] if b is not None]
            top.release_blocks([b for b in result[cut:] if b is not None])
            for ti, run in segments:
                if ti:
                    self._order[ti].release_blocks(run)
            return out
        except BaseException:
            for _, b in items:
                b.release()
            top.release_blocks(dst)
            top.release_blocks([b for b in result if b is not None])
            raise

    @staticmethod
    def _allocate_up_to(pool: BlockPool, n: int) -> list[MutableBlock]:
        """Allocate as many of ``n`` blocks as the pool can give now (racing callers may take some)."""
        room = min(n, pool.available_blocks())
        while room > 0:
            try:
                return pool.allocate_blocks(room)
            except NotEnoughBlocksAvailable as exc:
                room = min(room - 1, exc.available)
        return []

    # ------------------------------------------------------------------------------------------------- demotion
    def _make_demoter(self, upper: BlockPool, lower: BlockPool) -> Any:
        size = self.model.block_size_bytes

        def demote(victims: list[tuple[bytes, int]]) -> None:
            # Runs under the upper pool's lock, before the victims' slots are reused: their bytes are intact.
            todo = [(h, s) for h, s in victims if h not in lower]
            if not todo:
                return
            room = lower.available_blocks()
            dropped = len(todo) - room if room < len(todo) else 0
            todo = todo[: len(todo) - dropped]
            try:
                dst = lower.allocate_blocks(len(todo)) if todo else []
                if dst:
                    data, _ = upper.storage.gather([s for _, s in todo])
                    lower.scatter(dst, data)
                    lower.release_blocks(lower.register_blocks(dst, [h for h, _ in todo]))
            except Exception:
                log.exception("demotion of %d blocks %s -> %s failed", len(todo), upper.tier, lower.tier)
                with self._counter_lock:
                    self._counters.failed_transfers += len(todo)
                    self._counters.dropped_demotions += dropped
                return
            with self._counter_lock:
                self._counters.demotions += len(todo)
                self._counters.bytes_demoted += len(todo) * size
                self._counters.dropped_demotions += dropped

        return demote

    # -------------------------------------------------------------------------------------------------- metrics
    def metrics(self) -> dict[str, Any]:
        """Per-tier counters and the offload counters (see the contract's Metrics section)."""
        out: dict[str, Any] = {}
        for tier, pool in self._pools.items():
            out[tier] = pool.stats()
        c = self._counters
        out["offload"] = {
            "demotions": c.demotions,
            "promotions": c.promotions,
            "bytes_demoted": c.bytes_demoted,
            "bytes_promoted": c.bytes_promoted,
            "queue_depth": 0,
            "corrupt_blocks": c.corrupt_blocks + sum(p.metrics.corrupt for p in self._pools.values()),
            "failed_transfers": c.failed_transfers,
            "dropped_demotions": c.dropped_demotions,
        }
        return out

    # ------------------------------------------------------------------------------------------------ lifecycle
    def flush(self) -> None:
        """Wait until queued demotions are done and disk writes are durable."""
        self._check_open()
        disk = self._pools.get("disk")
        if disk is not None:
            disk.storage.flush()  # type: ignore[attr-defined]

    def close(self) -> None:
        """Flush, stop background work and close files; idempotent."""
        with self._close_lock:
            if self._closed:
                return
            try:
                disk = self._pools.get("disk")
                if disk is not None:
                    disk.storage.flush()  # type: ignore[attr-defined]
            finally:
                self._closed = True
                self._close_storages()

    def _close_storages(self) -> None:
        for pool in self._pools.values():
            try:
                pool.storage.close()
            except Exception:
                log.exception("closing the %s tier failed", pool.tier)

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

