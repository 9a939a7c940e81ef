"""The offload scheduler and the manager's three-tier behaviour: queue, cleaning, sharing, events, requests."""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path

import pytest
import torch
from kvdata import SMALL, block_data, content_for, fill, store

from tiered_kv import (
    DiskConfig,
    KvBlockManager,
    KvBlockManagerConfig,
    LayoutConfig,
    NotEnoughBlocksAvailable,
    OffloadConfig,
    ShutdownError,
)
from tiered_kv.events import KvEvent
from tiered_kv.storage.disk import DiskBackend, GatedBackend, PosixBackend

#: No cleaning ahead of need: every copy below is caused by an eviction.
EVICTION_ONLY = OffloadConfig(low_watermark=0.0, background_cleaning=False)


def three_tier(
    path: Path,
    device: int = 4,
    host: int = 8,
    disk: int = 64,
    writeback_s: float | None = None,
    offload: OffloadConfig | None = None,
    backend: DiskBackend | None = None,
) -> KvBlockManager:
    """Three tiers; the eviction path alone by default (no background writeback)."""
    return KvBlockManager(
        KvBlockManagerConfig(
            model=SMALL,
            device=LayoutConfig(num_blocks=device),
            host=LayoutConfig(num_blocks=host),
            disk=DiskConfig(
                path=str(path), num_blocks=disk, backend="posix", durability="none", writeback_s=writeback_s
            ),
            device_type="cpu",
            offload=offload or OffloadConfig(),
        ),
        disk_backend=backend,
    )


def test_demotion_never_copies_twice(tmp_path: Path) -> None:
    with three_tier(tmp_path, device=2, host=4, offload=EVICTION_ONLY) as bm:
        hs = bm.sequence_hashes(list(range(4 * 2)))
        store(bm, hs)  # 2 blocks, fit in the device tier
        other = bm.sequence_hashes(list(range(1000, 1000 + 4 * 2)))
        store(bm, other)  # evicts hs -> host
        bm.flush()
        first = bm.metrics()["offload"]["per_pair"].get("device->host", 0)
        got = bm.match_sequence_hashes(hs)  # promoted back; host copy stays (inclusive)
        bm.top.release_blocks(got)
        bm.flush()
        d1 = bm.metrics()["offload"]["per_pair"].get("device->host", 0)
        # 'other' was evicted to make room: those were dirty, so they were copied; hs were not copied again.
        assert d1 - first == 2
        got = bm.match_sequence_hashes(other)
        bm.top.release_blocks(got)
        assert bm.metrics()["offload"]["per_pair"].get("device->host", 0) == d1  # hs evicted clean: no copy


def test_queued_demotions_stay_matchable(tmp_path: Path) -> None:
    gate = GatedBackend(PosixBackend(), closed=True)
    with three_tier(tmp_path, device=2, host=2, disk=64, offload=EVICTION_ONLY, backend=gate) as bm:
        disk_pool = bm.disk()
        assert disk_pool is not None
        hs = bm.sequence_hashes(list(range(4 * 8)))
        store(bm, hs)  # 8 blocks through device 2 + host 2: at least 4 are queued toward the disk
        assert gate.wait_blocked(1)  # a writer holds a batch at the gate: nothing queued has reached the disk
        assert bm.metrics()["offload"]["queue_depth"] > 0
        queued = [h for h in hs if h not in bm.top and h not in bm.host() and h not in disk_pool]  # type: ignore[operator]
        assert queued
        got = bm.match_sequence_hashes(hs[: hs.index(queued[0]) + 1])  # matched from the queued snapshot
        assert got and got[-1].sequence_hash == queued[0]
        assert torch.equal(block_data(got[-1]), content_for(queued[0]))
        bm.top.release_blocks(got)
        gate.open_gate()
        bm.flush()
        assert bm.metrics()["offload"]["queue_depth"] == 0 and queued[0] in disk_pool


def test_sync_disk_makes_the_disk_durable_without_waiting_for_the_movers(tmp_path: Path) -> None:
    gate = GatedBackend(PosixBackend(), closed=True)
    with three_tier(tmp_path, device=2, host=2, disk=64, offload=EVICTION_ONLY, backend=gate) as bm:
        disk_pool = bm.disk()
        assert disk_pool is not None
        gate.open_gate()
        first = bm.sequence_hashes(list(range(4 * 6)))
        store(bm, first)
        bm.flush()
        on_disk = set(disk_pool.cached_hashes())
        assert on_disk
        gate.close_gate()
        store(bm, bm.sequence_hashes(list(range(500, 500 + 4 * 6))))
        assert gate.wait_blocked(1)  # a demotion is held at the gate
        bm.sync_disk()  # returns with the writer still blocked: it waits for no mover (flush() would)
        assert gate.wait_blocked(1) and bm.metrics()["offload"]["queue_depth"] > 0
        assert on_disk <= set(disk_pool.cached_hashes())
        gate.open_gate()


def test_sync_disk_without_a_disk_tier_is_a_no_op() -> None:
    cfg = KvBlockManagerConfig(model=SMALL, device=LayoutConfig(num_blocks=4), device_type="cpu")
    with KvBlockManager(cfg) as bm:
        bm.sync_disk()


def test_bounded_queue_drops_instead_of_blocking(tmp_path: Path) -> None:
    gate = GatedBackend(PosixBackend(), closed=True)
    offload = OffloadConfig(low_watermark=0.0, background_cleaning=False, max_queued_blocks=2, writers=1)
    with three_tier(tmp_path, device=2, host=2, disk=64, offload=offload, backend=gate) as bm:
        store(bm, bm.sequence_hashes(list(range(4 * 20))))
        # store() returned while the disk held every write: serving did not wait for it (had it waited, the
        # gate's own time-out would have failed the writes and nothing would be on disk below).
        assert gate.wait_blocked(1) and gate.passed == 0
        assert bm.metrics()["offload"]["dropped_demotions"] > 0
        gate.open_gate()
        bm.flush()
        assert len(bm.disk()) > 0  # type: ignore[arg-type]


def test_concurrent_matches_share_one_promotion(tmp_path: Path) -> None:
    with three_tier(tmp_path, device=16, host=16) as bm:
        hs = bm.sequence_hashes(list(range(4 * 8)))
        host = bm.host()
        assert host is not None
        blocks = host.allocate_blocks(8)
        for b, h in zip(blocks, hs):
            fill(b, h)
        host.release_blocks(host.register_blocks(blocks, hs))
        results: list[list] = []
        barrier = threading.Barrier(4)

        def go() -> None:
            barrier.wait()
            results.append(bm.match_sequence_hashes(hs))

        threads = [threading.Thread(target=go) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all([b.sequence_hash for b in r] == hs for r in results)
        assert bm.metrics()["offload"]["promotions"] == 8  # each block copied up once
        for r in results:
            bm.top.release_blocks(r)


def test_threads_and_asyncio_under_a_tiny_device_tier(tmp_path: Path) -> None:
    with three_tier(tmp_path, device=6, host=12, disk=200) as bm:
        convs = [bm.sequence_hashes(list(range(c * 10_000, c * 10_000 + 4 * 12))) for c in range(12)]
        wrong: list[str] = []
        errors: list[BaseException] = []

        def turn(rng: random.Random) -> None:
            hs = convs[rng.randrange(len(convs))][: rng.randrange(1, 7)]
            got = bm.match_sequence_hashes(hs)
            try:
                for b in got:
                    if not torch.equal(block_data(b), content_for(b.sequence_hash)):
                        wrong.append(b.sequence_hash.hex())
                missing = hs[len(got) :]
                try:
                    new = bm.top.allocate_blocks(len(missing))
                except NotEnoughBlocksAvailable:
                    return
                for b, h in zip(new, missing):
                    fill(b, h)
                got += bm.top.register_blocks(new, missing)
            finally:
                bm.top.release_blocks(got)

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(60):
                    turn(rng)
            except BaseException as exc:
                errors.append(exc)

        async def async_clients() -> None:
            async def client(seed: int) -> None:
                rng = random.Random(seed)
                for _ in range(30):
                    hs = convs[rng.randrange(len(convs))][: rng.randrange(1, 5)]
                    got = await bm.match_sequence_hashes_async(hs)
                    for b in got:
                        if not torch.equal(block_data(b), content_for(b.sequence_hash)):
                            wrong.append(b.sequence_hash.hex())
                    bm.top.release_blocks(got)

            await asyncio.gather(*(client(100 + i) for i in range(3)))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        asyncio.run(async_clients())
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "deadlock"
        assert not errors, errors
        assert not wrong
        bm.flush()
        m = bm.metrics()
        assert m["offload"]["demotions"] > 0 and m["offload"]["promotions"] > 0
        assert m["device"]["available_blocks"] == 6  # nothing leaked


def test_close_while_work_is_queued(tmp_path: Path) -> None:
    bm = three_tier(tmp_path, device=2, host=2, disk=64, offload=EVICTION_ONLY)
    assert bm.scheduler.alive_threads() > 0
    store(bm, bm.sequence_hashes(list(range(4 * 30))))
    bm.close()
    assert bm.scheduler.alive_threads() == 0
    with pytest.raises(ShutdownError):
        bm.match_sequence_hashes(bm.sequence_hashes(list(range(8))))
    with three_tier(tmp_path, device=2, host=2, disk=64) as again:  # what was written is there
        disk = again.disk()
        assert disk is not None and len(disk) > 0
        got = again.disk().match_sequence_hashes(disk.cached_hashes()[:1])  # type: ignore[union-attr]
        assert torch.equal(block_data(got[0]), content_for(got[0].sequence_hash))
        got[0].release()


def test_events_and_pressure(tmp_path: Path) -> None:
    with three_tier(tmp_path, device=4, host=8) as bm:
        events: list[KvEvent] = []
        bm.subscribe(events.append)
        pressure: list[tuple[str, float]] = []
        bm.on_memory_pressure(lambda tier, u: pressure.append((tier, u)), threshold=0.75)
        hs = bm.sequence_hashes(list(range(4 * 8)))
        held = []
        for i in range(0, 4):
            b = bm.top.allocate_blocks(1)
            fill(b[0], hs[i])
            held += bm.top.register_blocks(b, hs[i : i + 1])
        def stored() -> set[bytes]:
            return {h for e in list(events) if e.kind == "stored" and e.tier == "device" for h in e.sequence_hashes}

        bm.deliver_events_now()
        assert pressure and pressure[0][0] == "device" and pressure[0][1] >= 0.75
        assert set(hs[:4]) <= stored()
        bm.top.release_blocks(held)
        evicted = bm.trigger_eviction("aggressive")
        assert evicted == 4 and bm.top.available_blocks() == 4
        bm.deliver_events_now()
        assert any(e.kind == "removed" and e.tier == "device" for e in events)
        with pytest.raises(ValueError, match="mode"):
            bm.trigger_eviction("gentle")


def test_request_level_api(two_tier: KvBlockManager) -> None:
    bm = two_tier
    assert bm.can_allocate(16) and not bm.can_allocate(17)
    table = bm.allocate_for_request("r1", 5)  # 2 blocks of 4 tokens
    assert len(table) == 2 and bm.get_block_table("r1") == table
    assert bm.extend("r1", 3) == []  # 8 tokens still fit in 2 blocks
    new = bm.extend("r1", 1)
    assert len(new) == 1 and bm.get_block_table("r1") == table + new
    with pytest.raises(ValueError, match="already"):
        bm.allocate_for_request("r1", 1)
    with pytest.raises(NotEnoughBlocksAvailable):
        bm.allocate_for_request("r2", 9)
    bm.free_request("r1")
    assert bm.top.available_blocks() == 4
    with pytest.raises(KeyError):
        bm.free_request("r1")
    with pytest.raises(ValueError, match="num_tokens"):
        bm.allocate_for_request("r3", -1)


def test_cleaner_does_not_churn_when_host_is_smaller_than_device(tmp_path: Path) -> None:
    cfg = KvBlockManagerConfig(
        model=SMALL, device=LayoutConfig(num_blocks=8), host=LayoutConfig(num_blocks=4), device_type="cpu",
        offload=OffloadConfig(background_cleaning=False),
    )
    with KvBlockManager(cfg) as bm:
        store(bm, bm.sequence_hashes(list(range(4 * 12))))
        first = bm.run_cleaner_once()  # cleans what it can: the device's next victims, as far as the host holds
        assert first > 0
        before = bm.metrics()["offload"]["demotions"]
        # Idle: further passes find nothing to do (before the room-below fix, each pass evicted host copies of
        # the device's next victims to copy other victims down, and cleaning chased its tail).
        assert [bm.run_cleaner_once() for _ in range(3)] == [0, 0, 0]
        assert bm.metrics()["offload"]["demotions"] == before


def test_a_block_written_by_a_nested_ancestor_write_is_not_written_again(tmp_path: Path) -> None:
    # Chain h -> p -> x: h and x in the device tier, p in the host tier only. persist() copies [h, x] from the
    # device; x's parent p goes first (from the host), and writing p writes its own parent h first: h is then on
    # disk before the outer batch is copied, and must not be written a second time.
    with three_tier(tmp_path, device=4, host=4, offload=EVICTION_ONLY) as bm:
        h, p, x = bm.sequence_hashes(list(range(4 * 3)))
        device, host, disk = bm.device(), bm.host(), bm.disk()
        assert device is not None and host is not None and disk is not None
        for pool, hs in ((device, [h]), (host, [p]), (device, [x])):
            blocks = pool.allocate_blocks(len(hs))
            for b, sh in zip(blocks, hs):
                fill(b, sh)
            pool.release_blocks(pool.register_blocks(blocks, hs))
        assert p not in device and h not in host
        assert bm.persist() == 3  # every block counted once: the nested ancestor writes too
        pairs = bm.metrics()["offload"]["per_pair"]
        assert pairs.get("device->disk", 0) == 2 and pairs.get("host->disk", 0) == 1  # each block written once
        assert all(sh in disk for sh in (h, p, x))
        got = bm.match_sequence_hashes([h, p, x])
        assert [b.sequence_hash for b in got] == [h, p, x]
        bm.top.release_blocks(got)


def test_with_cleaners_an_eviction_bypasses_a_tier_whose_next_victims_are_dirty(tmp_path: Path) -> None:
    """Cleaners on (idle here: low watermark 0): a device victim takes only free or clean host room; with the host
    full of blocks not yet below, it goes straight to the disk queue in one copy, and the host keeps its blocks
    (no snapshot of them under the host's lock on the evicting thread)."""
    idle_cleaners = OffloadConfig(low_watermark=0.0, background_cleaning=True)
    with three_tier(tmp_path, device=2, host=2, offload=idle_cleaners) as bm:
        disk_pool, host = bm.disk(), bm.host()
        assert disk_pool is not None and host is not None
        a, b, c = (bm.sequence_hashes(list(range(k, k + 4 * 2))) for k in (0, 1000, 2000))
        store(bm, a)
        store(bm, b)  # a: device -> host (free room there)
        store(bm, c)  # b: the host holds only a (dirty): b bypasses it
        bm.flush()
        assert all(h in host for h in a) and all(h in disk_pool for h in b)
        assert not any(h in disk_pool for h in a)
        pairs = bm.metrics()["offload"]["per_pair"]
        assert pairs.get("device->disk", 0) == 2 and pairs.get("host->disk", 0) == 0
        got = bm.match_sequence_hashes(b)
        assert [g.sequence_hash for g in got] == b
        assert all(torch.equal(block_data(g), content_for(h)) for g, h in zip(got, b))
        bm.top.release_blocks(got)


def test_without_cleaners_evictions_keep_the_chain(tmp_path: Path) -> None:
    """Stepped (no cleaner threads): each tier pushes out its own least recent blocks, as before."""
    with three_tier(tmp_path, device=2, host=2, offload=EVICTION_ONLY) as bm:
        disk_pool, host = bm.disk(), bm.host()
        assert disk_pool is not None and host is not None
        a, b, c = (bm.sequence_hashes(list(range(k, k + 4 * 2))) for k in (0, 1000, 2000))
        store(bm, a)
        store(bm, b)
        store(bm, c)
        bm.flush()
        assert all(h in host for h in b) and all(h in disk_pool for h in a)
        assert bm.metrics()["offload"]["per_pair"].get("host->disk", 0) == 2


def test_merged_demotion_jobs_count_each_block_under_its_own_tier_pair(tmp_path: Path) -> None:
    """Jobs queued toward the disk merge into one write; the per-pair counters still name plain pairs (a merged
    job once named its pair "device->disk+host->disk+...", one new metric label per merge)."""
    from tiered_kv.offload import _Job, _merge_jobs

    with three_tier(tmp_path, offload=EVICTION_ONLY) as bm:
        disk_pool = bm.disk()
        assert disk_pool is not None
        a = _Job(disk_pool, ["device->disk"] * 2, [b"a" * 16, b"b" * 16], [], [None, None], [None, None], 1.0)
        b = _Job(disk_pool, ["host->disk"], [b"c" * 16], [], [None], [None], 0.5)
        merged = _merge_jobs(a, b)
        assert merged is not None
        assert merged.pairs == ["device->disk", "device->disk", "host->disk"] and merged.queued_at == 0.5


def test_lost_blocks_are_reaped_without_a_manager_call() -> None:
    """A caller that only uses a pool (no match through the manager, no movers): evicted heads' descendants are
    still reaped, by the reaper thread, and the lost hashes do not pile up (they grew by one per eviction)."""
    from tiered_kv.offload import REAP_BACKLOG

    cfg = KvBlockManagerConfig(model=SMALL, device=LayoutConfig(num_blocks=64), device_type="cpu")
    with KvBlockManager(cfg) as bm:
        chain = bm.sequence_hashes(list(range(4 * 3 * REAP_BACKLOG)))
        # One chain through 64 slots, a block at a time: every eviction takes a head whose child is still here (the
        # rest is garbage), so every eviction reports a lost hash, even where the pool alone reports only parents.
        store(bm, chain, batch=1)
        assert bm.scheduler.wait_for_reaper(10.0)
        assert len(bm.scheduler._lost) < REAP_BACKLOG
        assert bm.metrics()["offload"]["reaped"] > 0
        bm.scheduler.reap()  # the last few lost hashes (under the backlog) too: then nothing unreachable is left
        present = [h in bm.top for h in chain]
        assert not any(present) or present.index(True) == 0


def test_persist_counts_the_ancestors_it_writes_first(tmp_path: Path) -> None:
    """A chain whose head sits in the host and tail in the device: persist() writes the head first (so the chain
    reaches the disk) and counts it (it returned only the tail's count)."""
    with three_tier(tmp_path, device=2, host=4, offload=EVICTION_ONLY) as bm:
        disk_pool = bm.disk()
        assert disk_pool is not None
        chain = bm.sequence_hashes(list(range(4 * 4)))
        store(bm, chain)  # the first two go down to the host when the last two arrive
        assert all(h in bm.host() for h in chain[:2]) and all(h in bm.top for h in chain[2:])  # type: ignore[operator]
        assert not any(h in disk_pool for h in chain)
        assert bm.persist() == 4
        assert all(h in disk_pool for h in chain)
