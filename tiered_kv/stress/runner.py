"""Running the workload against one open store: client threads, asyncio tasks, the tier checker, checkpoints.

:class:`Workers` is shared by the in-process run (:func:`run_in_process`) and the child process of kill mode
(:mod:`tiered_kv.stress.child`). :func:`open_store` builds the store a run drives, with the fault-injecting
backend around the posix backend when faults are asked for, and the planted bug when the harness is tested.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..manager import KvBlockManager
from ..storage.disk import FaultInjectingBackend, PosixBackend
from .clients import RecentPrefixes, StoreClient, TierChecker, plant_wrong_bytes
from .content import BlockContent
from .durability import DiskLedger, verify_disk
from .options import StressOptions
from .stats import Stats
from .workload import ConversationWorkload

log = logging.getLogger("tiered_kv.stress")

__all__ = ["Workers", "open_store", "run_in_process", "RunResult", "Progress"]

#: Called about twice a second with (elapsed seconds, merged stats, store metrics, crashes).
Progress = Callable[[float, Stats, dict[str, Any], int], None]


def open_store(opts: StressOptions, seed: int) -> tuple[KvBlockManager, FaultInjectingBackend | None]:
    """Open the store a run drives (and the fault injector around its disk backend, when faults are on)."""
    os.makedirs(opts.tier_path, exist_ok=True)
    faults = None
    backend: Any = None
    if opts.faults > 0:
        faults = FaultInjectingBackend(PosixBackend(), opts.faults, seed=seed)
        backend = faults
    bm = KvBlockManager(opts.config(), disk_backend=backend)
    if opts.plant_bug == "wrong-bytes":
        plant_wrong_bytes(bm)
    return bm, faults


class Workers:
    """The clients of one process life: ``opts.threads`` threads, ``opts.tasks`` asyncio tasks, one checker.

    Args:
        bm: the store.
        opts: the run's options.
        life: how many times the workload was killed before (changes the clients' random streams).
    """

    def __init__(self, bm: KvBlockManager, opts: StressOptions, life: int = 0) -> None:
        self.bm = bm
        self.opts = opts
        self.content = BlockContent(bm.model)
        self.workload = ConversationWorkload(opts.shape, opts.seed, bm.model.page_size, bm.sequence_hashes)
        self.recent = RecentPrefixes()
        self.stop_event = threading.Event()
        self.wrong_examples: list[str] = []
        self._wrong_lock = threading.Lock()
        n = opts.threads + opts.tasks
        self.client_stats = [Stats() for _ in range(n + 1)]
        self.clients = [
            StoreClient(bm, self.content, self.workload.stream(i, life), self.client_stats[i], self.recent,
                        self._wrong)
            for i in range(n)
        ]
        self.checker = TierChecker(bm, self.content, self.recent, self.client_stats[n], self._wrong,
                                   opts.seed + 7919 * life)
        self._threads: list[threading.Thread] = []

    def _wrong(self, text: str) -> None:
        with self._wrong_lock:
            if len(self.wrong_examples) < 10:
                self.wrong_examples.append(text)

    def stats(self) -> Stats:
        """Everything counted so far (read without locks: counters may be a few ops behind)."""
        return Stats.merged(self.client_stats)

    def start(self) -> None:
        """Start every client and the checker."""
        opts = self.opts
        for i, client in enumerate(self.clients[: opts.threads]):
            self._spawn(functools.partial(client.run, self.stop_event), "stress-client", self.client_stats[i])
        if opts.tasks:
            self._spawn(self._event_loop, "stress-async", self.client_stats[opts.threads])
        self._spawn(lambda: self.checker.run(self.stop_event, opts.check_interval), "stress-checker",
                    self.client_stats[-1])

    def _spawn(self, target: Callable[[], None], name: str, stats: Stats) -> None:
        def guarded() -> None:
            try:
                target()
            except Exception as exc:  # an unexpected failure of the store: counted and shown, never silent
                stats.add("client_failures")
                where = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}"
                                    for f in reversed(traceback.extract_tb(exc.__traceback__)[-4:]))
                self._wrong(f"{name} died: {type(exc).__name__}: {exc} (at {where})")
                log.exception("%s died", name)

        t = threading.Thread(target=guarded, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _event_loop(self) -> None:
        async def main() -> None:
            await asyncio.gather(*(c.run_async(self.stop_event) for c in self.clients[self.opts.threads :]))

        asyncio.run(main())

    def stop(self) -> None:
        """Ask every client to stop and wait for them."""
        self.stop_event.set()
        for t in self._threads:
            t.join(30)


@dataclass
class RunResult:
    """What a run measured (before it is turned into a report)."""

    stats: Stats
    metrics: dict[str, Any]
    elapsed: float
    crashes: int = 0
    faults_injected: int = 0
    detected_extra: int = 0  # detected corruptions found by reopen checks (not in the store's metrics)
    disk_evictions: int = 0
    lives: int = 1
    examples: list[str] = field(default_factory=list)


def run_in_process(opts: StressOptions, progress: Progress | None = None) -> RunResult:
    """Run the workload in this process for ``opts.duration`` seconds, then check durability by reopening."""
    bm, faults = open_store(opts, opts.seed)
    content = BlockContent(bm.model)
    ledger = DiskLedger(bm)
    workers = Workers(bm, opts)
    lost_live = 0
    examples: list[str] = []
    t0 = time.monotonic()
    deadline = t0 + opts.duration
    next_checkpoint = t0 + opts.checkpoint_interval
    try:
        workers.start()
        while (now := time.monotonic()) < deadline:
            time.sleep(min(0.5, max(0.0, deadline - now), max(0.0, next_checkpoint - now)))
            if time.monotonic() >= next_checkpoint:
                # Blocks durable at an earlier checkpoint and never reported removed must still be there.
                missing = ledger.missing_live()
                lost_live += len(missing)
                examples.extend(f"durable block {h.hex()[:16]} vanished from the live disk tier" for h in missing[:3])
                ledger.required.difference_update(missing)  # count each loss once
                ledger.checkpoint()
                next_checkpoint = time.monotonic() + opts.checkpoint_interval
            if progress is not None:
                progress(time.monotonic() - t0, workers.stats(), bm.metrics(), 0)
        workers.stop()
        elapsed = time.monotonic() - t0
        ledger.checkpoint()
        if opts.plant_bug == "lose-blocks" and ledger.required:
            _forget_one(bm, sorted(ledger.required)[0])
        metrics = bm.metrics()
    finally:
        workers.stop()
        bm.close()  # delivers the last removal events to the ledger
        ledger.close()
    stats = workers.stats()
    stats.add("lost", lost_live)
    # Reopen the tier (no faults now) and check every durable block's bytes, and every other block's.
    with KvBlockManager(opts.config(disk_only=True)) as check_bm:
        check = verify_disk(check_bm, content, ledger.required)
    stats.add("blocks_verified", check.verified)
    stats.add("verified_disk", check.verified)
    stats.add("wrong", check.wrong)
    stats.add("lost", check.lost + (0 if opts.faults > 0 else check.corrupt_required))
    stats.add("unreachable", check.unreachable)
    stats.add("not_prefix_closed", check.not_prefix_closed)
    return RunResult(
        stats=stats,
        metrics=metrics,
        elapsed=elapsed,
        faults_injected=sum(faults.injected.values()) if faults is not None else 0,
        detected_extra=check.corrupt if opts.faults > 0 else 0,
        disk_evictions=int(metrics.get("disk", {}).get("evictions", 0)),
        examples=workers.wrong_examples + examples + check.examples,
    )


def _forget_one(bm: KvBlockManager, h: bytes) -> None:
    """Planted bug ``lose-blocks``: drop a durable block's registry row behind the pool's back (no event)."""
    disk = bm.disk()
    assert disk is not None
    disk.storage.store.delete([h])  # type: ignore[attr-defined]
