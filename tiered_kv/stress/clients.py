"""The clients of a stress run: each serves requests against the store and verifies every block it gets back.

One request is what a serving engine does for a prompt: match the longest cached prefix (promoting blocks up from
host or disk), verify the returned blocks' bytes, allocate the missing blocks in the top tier, fill them with the
bytes of their hash, register them, release everything. Sync clients run on threads; async clients are asyncio
tasks (``match_sequence_hashes_async`` / ``allocate_blocks_async``) sharing one event loop thread.

:class:`TierChecker` looks below the top tier directly: it matches recent prefixes in the host and disk pools
(no promotion) and verifies those blocks too, so a wrong byte on any tier is seen even if no client promotes it.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..blocks import ImmutableBlock, MutableBlock
from ..errors import NotEnoughBlocksAvailable, ShutdownError, TieredKvError
from ..manager import KvBlockManager
from .content import BlockContent
from .stats import Stats
from .workload import Request, RequestStream

__all__ = ["StoreClient", "TierChecker", "RecentPrefixes", "plant_wrong_bytes"]

#: Attempts of one request before it is given up as backpressure (the top tier stayed full).
_ATTEMPTS = 4

#: One batch of a client in this many also writes and checks its blocks through ``layer_view``, one layer at a
#: time; the others in one ``scatter`` / ``gather`` per batch, as a serving engine moves KV. Per-layer copies cost a
#: few small torch calls per block, each dropping the GIL: with 16 client threads they caused 2,260 context switches
#: per request (620 with 4), and the harness, not the store, set the pace.
LAYER_VIEW_EVERY = 8


class RecentPrefixes:
    """A bounded pool of recently served prefixes (for the tier checker to look up below the top tier)."""

    def __init__(self, size: int = 256) -> None:
        self._items: deque[list[bytes]] = deque(maxlen=size)

    def add(self, hashes: list[bytes]) -> None:
        """Remember one served prefix (a deque append: thread-safe)."""
        self._items.append(hashes)

    def sample(self, rng: random.Random, k: int) -> list[list[bytes]]:
        """Up to ``k`` remembered prefixes."""
        items = list(self._items)
        return rng.sample(items, min(k, len(items)))


class _Failure(Exception):
    """The store refused room for a request; the client backs off and retries."""


class StoreClient:
    """Serves requests from one stream against the store and counts what it sees in ``stats``.

    Args:
        bm: the store.
        content: block bytes per hash.
        stream: where requests come from.
        stats: this client's counters (owned by this client: no lock).
        recent: shared pool of served prefixes, for the tier checker.
        wrong_log: called with a description of each wrong block found.
    """

    def __init__(
        self,
        bm: KvBlockManager,
        content: BlockContent,
        stream: RequestStream,
        stats: Stats,
        recent: RecentPrefixes,
        wrong_log: Callable[[str], None],
    ) -> None:
        self.bm = bm
        self.top = bm.top
        self.content = content
        self.stream = stream
        self.stats = stats
        self.recent = recent
        self.wrong_log = wrong_log
        self.rng = random.Random(stream.tag)
        self._batches = 0  # batches verified or filled: every LAYER_VIEW_EVERY-th goes through layer_view

    # ---------------------------------------------------------------------------------------- shared steps
    def _per_layer(self) -> bool:
        self._batches += 1
        return self._batches % LAYER_VIEW_EVERY == 0

    def _verify(self, blocks: Sequence[ImmutableBlock], hashes: Sequence[bytes], what: str) -> None:
        if not blocks:
            return
        stats = self.stats
        hashes = list(hashes[: len(blocks)])  # a match's blocks are a prefix of the request's hashes
        wrong = {i for i, (blk, h) in enumerate(zip(blocks, hashes)) if blk.sequence_hash != h}
        if self._per_layer():
            wrong |= {i for i, (blk, h) in enumerate(zip(blocks, hashes)) if not self.content.matches(blk, h)}
        else:  # one copy of the batch through the pool's gather (matched blocks are all in the top tier)
            data, bad = blocks[0].pool.gather(blocks)
            if bad:  # failed verification in the tier itself (dropped there): wrong, not compared
                wrong |= set(bad)
                good = [i for i in range(len(blocks)) if i not in wrong]
                if good:
                    wrong |= {good[j] for j in self.content.matches_data(data[good], [hashes[i] for i in good])}
            else:
                wrong |= set(self.content.matches_data(data, hashes))
        for i, (blk, h) in enumerate(zip(blocks, hashes)):
            stats.counters["blocks_verified"] += 1
            stats.counters["verified_" + blk.tier] += 1
            if i in wrong:
                stats.counters["wrong"] += 1
                self.wrong_log(f"{what}: {blk.tier} block {blk.block_id} returned for {h.hex()[:16]} has wrong bytes")

    def _fill_register(self, new: list[MutableBlock], hashes: list[bytes]) -> list[ImmutableBlock]:
        if self._per_layer():
            for blk, h in zip(new, hashes):
                self.content.fill(blk, h)
        elif new:
            self.top.scatter(new, torch.stack([self.content.tensor(h) for h in hashes]))
        registered = self.top.register_blocks(new, hashes)
        self.stats.counters["blocks_allocated"] += len(new)
        # A hash registered meanwhile by another client is deduplicated to that client's block: check it.
        dedup = [(b, h) for b, h, m in zip(registered, hashes, new) if b.block_id != m.block_id]
        if dedup:
            self._verify([b for b, _ in dedup], [h for _, h in dedup], "register")
        return registered

    def _done(self, req: Request, matched: int) -> None:
        c = self.stats.counters
        c["ops"] += 1
        c["blocks_requested"] += len(req.hashes)
        c["blocks_matched"] += matched
        if req.kind == "document":
            c["documents"] += 1
        elif req.hashes:
            self.recent.add(req.hashes)

    # ------------------------------------------------------------------------------------------------ sync
    def serve_one(self) -> None:
        """Serve the next request of the stream (retrying a few times when the top tier is full)."""
        req = self.stream.next_request()
        for attempt in range(_ATTEMPTS):
            try:
                self._serve(req)
                return
            except _Failure:
                time.sleep(self.rng.uniform(0.0005, 0.002) * (attempt + 1))
            except ShutdownError:
                raise
            except TieredKvError:
                self.stats.counters["errors"] += 1
                return
        self.stats.counters["backpressure"] += 1

    def _serve(self, req: Request) -> None:
        t0 = time.perf_counter()
        blocks = self.bm.match_sequence_hashes(req.hashes)
        self.stats.match_latency.observe(time.perf_counter() - t0)
        held: list[Any] = list(blocks)
        try:
            self._verify(blocks, req.hashes, "match")
            missing = req.hashes[len(blocks) :]
            if missing:
                t1 = time.perf_counter()
                try:
                    new = self.top.allocate_blocks(len(missing))
                except NotEnoughBlocksAvailable as exc:
                    raise _Failure() from exc
                self.stats.allocate_latency.observe(time.perf_counter() - t1)
                held.extend(new)
                held.extend(self._fill_register(new, missing))
            self._done(req, len(blocks))
        finally:
            for b in held:
                b.release()

    def run(self, stop: threading.Event) -> None:
        """Serve requests until ``stop`` is set (or the store closes)."""
        while not stop.is_set():
            try:
                self.serve_one()
            except ShutdownError:
                return

    # ----------------------------------------------------------------------------------------------- async
    async def serve_one_async(self) -> None:
        """Async twin of :meth:`serve_one`."""
        req = self.stream.next_request()
        for attempt in range(_ATTEMPTS):
            try:
                await self._serve_async(req)
                return
            except _Failure:
                await asyncio.sleep(self.rng.uniform(0.0005, 0.002) * (attempt + 1))
            except ShutdownError:
                raise
            except TieredKvError:
                self.stats.counters["errors"] += 1
                return
        self.stats.counters["backpressure"] += 1

    async def _serve_async(self, req: Request) -> None:
        t0 = time.perf_counter()
        blocks = await self.bm.match_sequence_hashes_async(req.hashes)
        self.stats.match_latency.observe(time.perf_counter() - t0)
        held: list[Any] = list(blocks)
        try:
            self._verify(blocks, req.hashes, "match_async")
            missing = req.hashes[len(blocks) :]
            if missing:
                t1 = time.perf_counter()
                try:
                    new = await self.top.allocate_blocks_async(len(missing), timeout=0.01)
                except NotEnoughBlocksAvailable as exc:
                    raise _Failure() from exc
                self.stats.allocate_latency.observe(time.perf_counter() - t1)
                held.extend(new)
                held.extend(self._fill_register(new, missing))
            self._done(req, len(blocks))
        finally:
            for b in held:
                b.release()

    async def run_async(self, stop: threading.Event) -> None:
        """Serve requests until ``stop`` is set (or the store closes)."""
        while not stop.is_set():
            try:
                await self.serve_one_async()
            except ShutdownError:
                return
            await asyncio.sleep(0)


class TierChecker:
    """Verifies blocks of the host and disk tiers directly (pool matches: no promotion, no recency games).

    Args:
        bm: the store.
        content: block bytes per hash.
        recent: the prefixes clients served lately.
        stats: the checker's own counters.
        wrong_log: called with a description of each wrong block found.
        seed: seed of its sampling.
    """

    def __init__(
        self,
        bm: KvBlockManager,
        content: BlockContent,
        recent: RecentPrefixes,
        stats: Stats,
        wrong_log: Callable[[str], None],
        seed: int,
    ) -> None:
        self.bm = bm
        self.content = content
        self.recent = recent
        self.stats = stats
        self.wrong_log = wrong_log
        self.rng = random.Random(f"{seed}/checker")

    def check_once(self, samples: int = 8) -> None:
        """Look up a few recent prefixes in every tier below the top one and verify what is found."""
        for prefix in self.recent.sample(self.rng, samples):
            for pool in self.bm.pools()[1:]:
                try:
                    blocks = pool.match_sequence_hashes(prefix)
                except ShutdownError:
                    return
                try:
                    if not blocks:
                        continue
                    # One batched read per prefix (for the disk tier: checksum-verified; failures are dropped
                    # by the store and counted as corrupt, which is detection, not a wrong answer).
                    data, bad = pool.gather(blocks)
                    good = [i for i in range(len(blocks)) if i not in set(bad)]
                    hashes = [blocks[i].sequence_hash for i in good]
                    wrong = set(self.content.matches_data(data[good], hashes)) if good else set()
                    c = self.stats.counters
                    c["blocks_verified"] += len(good)
                    c["verified_" + pool.tier] += len(good)
                    for j in wrong:
                        c["wrong"] += 1
                        self.wrong_log(f"checker: {pool.tier} block for {hashes[j].hex()[:16]} has wrong bytes")
                except TieredKvError:
                    self.stats.counters["errors"] += 1
                finally:
                    pool.release_blocks(blocks)

    def run(self, stop: threading.Event, interval: float) -> None:
        """Check every ``interval`` seconds until ``stop`` is set."""
        while not stop.wait(interval):
            self.check_once()


def plant_wrong_bytes(bm: KvBlockManager, every: int = 10) -> None:
    """Plant a bug in ``bm`` (harness self-test): every ``every``-th multi-block match returns two blocks swapped."""
    inner = bm.match_sequence_hashes
    lock = threading.Lock()
    calls = [0]

    def buggy(hashes: Sequence[bytes], *args: Any, **kwargs: Any) -> list[ImmutableBlock]:
        out = inner(hashes, *args, **kwargs)
        if len(out) >= 2:
            with lock:
                calls[0] += 1
                hit = calls[0] % every == 0
            if hit:
                out[0], out[1] = out[1], out[0]
        return out

    bm.match_sequence_hashes = buggy  # type: ignore[method-assign]
