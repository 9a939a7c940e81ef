"""TieredKvTier as vLLM 0.33's secondary offloading tier, through vLLM's real TieringOffloadingManager (CPU primary
tier on a shared-memory region; no GPU) and through the tier's own API, as vLLM's tests of its file tier do.

Skipped where vLLM is not installed (tools/install_vllm.sh installs it on a CPU machine).
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("vllm.v1.kv_offload.tiering.base", reason="vLLM 0.33 is not installed (tools/install_vllm.sh)")

from vllm.v1.kv_offload.base import LookupResult, Medium, ReqContext
from vllm.v1.kv_offload.tiering.factory import SecondaryTierFactory
from vllm.v1.kv_offload.tiering.spec import TieringOffloadingSpec
from vllm_helpers import (
    END_STEP,
    aligned_rows,
    content,
    job,
    key,
    offloading_config,
    spec_with_tier,
    store_through_manager,
    tier_entry,
)

from tiered_kv import DiskTierError, LayoutMismatchError
from tiered_kv.config import DiskConfig
from tiered_kv.integrations.vllm import TieredKvTier, chunk_model, sequence_hash_of
from tiered_kv.storage.disk import DiskStore

pytestmark = pytest.mark.vllm

CHILD = str(Path(__file__).with_name("vllm_child.py"))
KIB64 = 64 * 1024
MIB2 = 2 * 1024 * 1024


def make_tier(path: Path, chunk: int = KIB64, rows: int = 8, num_blocks: int = 64, events: bool = False,
              model: str = "test-org/test-model", **more: Any) -> tuple[TieredKvTier, np.ndarray]:
    """A tier built by vLLM's factory from a config entry, over a stand-in primary tier of ``rows`` chunks."""
    cfg = offloading_config(chunk, model=model, events=events, tiers=[tier_entry(str(path), num_blocks, **more)])
    arr, view = aligned_rows(rows, chunk)
    entry = tier_entry(str(path), num_blocks, **more)
    if events:
        entry["enable_kv_events"] = True
    tier = SecondaryTierFactory.create_secondary_tier(entry, view, TieringOffloadingSpec(cfg))
    assert isinstance(tier, TieredKvTier)
    return tier, arr


def run_jobs(tier: TieredKvTier, *jobs: Any) -> dict[int, Any]:
    """Submit jobs, wait for them (drain_jobs), return their results by job id."""
    for j in jobs:
        (tier.submit_load if j.is_promotion else tier.submit_store)(j)
    tier.drain_jobs()
    results = {r.job_id: r for r in tier.get_finished_jobs()}
    assert set(results) == {j.job_id for j in jobs}
    return results


def fill(arr: np.ndarray, keys: list[bytes], chunk_ids: list[int]) -> None:
    for k, c in zip(keys, chunk_ids, strict=True):
        arr[c] = content(k, arr.shape[1])


def primary_rows(manager: Any) -> np.ndarray:
    n = manager.primary_tier._num_chunks
    return np.frombuffer(manager.primary_tier.get_kv_memoryview(), dtype=np.uint8).reshape(n, -1)


def promote(manager: Any, keys: list[bytes], req: str = "load") -> tuple[ReqContext, list[LookupResult]]:
    """vLLM's load path for chunks the primary tier lacks: lookup (promotion starts), step end, wait, lookup."""
    ctx = ReqContext(req_id=req)
    manager.on_new_request(ctx)
    first = [manager.lookup(k, ctx) for k in keys]
    manager.on_schedule_end(END_STEP)  # submit_load of the queued promotions
    for tier in manager.secondary_tiers:
        tier.drain_jobs()
    return ctx, first


# ------------------------------------------------------------------------------------------ through vLLM's manager
@pytest.mark.parametrize("chunk", [MIB2, KIB64], ids=["2MiB", "64KiB"])
def test_roundtrip_through_tiering_manager(tmp_path: Path, chunk: int) -> None:
    spec = spec_with_tier(chunk, str(tmp_path / "kv"), 64, primary_chunks=8)
    manager = spec.get_manager()
    try:
        tier = manager.secondary_tiers[0]
        assert isinstance(tier, TieredKvTier)
        keys = [key("rt", i) for i in range(6)]
        store_through_manager(manager, keys)
        assert len(tier._pool) == 6

        # Empty the primary tier and wipe its memory: whatever comes back must come from the disk tier.
        manager.reset_cache()
        manager.on_reset_flushed()
        rows = primary_rows(manager)
        rows[:] = 0
        ctx, first = promote(manager, keys)
        assert first == [LookupResult.HIT_PENDING] * 6
        assert [manager.lookup(k, ctx) for k in keys] == [LookupResult.HIT] * 6
        load = manager.prepare_load(keys, ctx)
        for k, cid in zip(keys, load.chunk_ids, strict=True):
            assert np.array_equal(rows[int(cid)], content(k, chunk))
        manager.complete_load(keys, ctx)
        manager.on_request_finished(ctx)

        stats = manager.get_stats()
        assert stats is not None
        flat = stats.reduce()
        assert flat["vllm:kv_offload_tiered_kv_loaded_bytes"] == 6 * chunk
        assert flat["vllm:kv_offload_tiered_kv_lookup_hits"] == 6
        infos = manager.config_info()
        assert infos[1]["tiered_kv_capacity_chunks"] == 64 and infos[1]["tiered_kv_remote"] is False
        del rows, load
    finally:
        gc.collect()
        region = manager.primary_tier._mmap_region
        manager.shutdown()
    # The tier dropped every view of the primary memory: vLLM could unmap its region.
    assert region.mmap_obj is None


def test_metric_and_info_definitions_cover_what_the_tier_reports(tmp_path: Path) -> None:
    tier, arr = make_tier(tmp_path / "kv")
    try:
        defs = TieredKvTier.build_metric_definitions({})
        keys = [key("m", i) for i in range(3)]
        fill(arr, keys, [0, 1, 2])
        run_jobs(tier, job(1, keys, [0, 1, 2], promotion=False))
        tier.lookup(keys[0], ReqContext(req_id="r"))
        tier.lookup(key("m", 99), ReqContext(req_id="r"))
        stats = tier.get_stats()
        assert stats is not None
        reported = set(stats.reduce())
        assert reported <= set(defs), reported - set(defs)
        assert {"vllm:kv_offload_tiered_kv_stored_bytes", "vllm:kv_offload_tiered_kv_lookup_misses"} <= reported
        assert set(tier.config_info()) == set(TieredKvTier.config_info_keys({}))
        again = tier.get_stats()  # counters are deltas: reset by the previous call
        assert again is not None and "vllm:kv_offload_tiered_kv_stored_bytes" not in again.reduce()
    finally:
        tier.shutdown()


# ------------------------------------------------------------------------------------------ the tier's own API
def test_store_lookup_load_into_other_chunk_ids(tmp_path: Path) -> None:
    tier, arr = make_tier(tmp_path / "kv", rows=8)
    try:
        ctx = ReqContext(req_id="r")
        keys = [key("own", i) for i in range(4)]
        assert [tier.lookup(k, ctx) for k in keys] == [LookupResult.MISS] * 4
        fill(arr, keys, [0, 2, 3, 1])  # chunk ids out of order and non-contiguous
        res = run_jobs(tier, job(1, keys, [0, 2, 3, 1], promotion=False))
        assert res[1].success and res[1].transfer_bytes == 4 * KIB64
        assert [tier.lookup(k, ctx) for k in keys] == [LookupResult.HIT] * 4
        arr[:] = 0
        res = run_jobs(tier, job(2, keys, [7, 6, 5, 4], promotion=True))
        assert res[2].success and res[2].successful_keys is None
        for k, c in zip(keys, [7, 6, 5, 4], strict=True):
            assert np.array_equal(arr[c], content(k, KIB64))
        assert not arr[:4].any()
        # Storing chunks the tier already holds writes nothing and succeeds.
        res = run_jobs(tier, job(3, keys, [7, 6, 5, 4], promotion=False))
        assert res[3].success and tier.metrics()["disk"]["cached_blocks"] == 4
    finally:
        tier.shutdown()


def test_partial_load_names_successful_keys(tmp_path: Path) -> None:
    tier, arr = make_tier(tmp_path / "kv")
    try:
        keys = [key("part", i) for i in range(3)]
        fill(arr, keys[:2], [0, 1])
        run_jobs(tier, job(1, keys[:2], [0, 1], promotion=False))
        arr[:] = 7
        res = run_jobs(tier, job(2, [keys[0], keys[2], keys[1]], [4, 5, 6], promotion=True))[2]
        assert not res.success
        assert set(res.successful_keys) == {keys[0], keys[1]}
        assert np.array_equal(arr[4], content(keys[0], KIB64)) and np.array_equal(arr[6], content(keys[1], KIB64))
        assert (arr[5] == 7).all()  # the missing chunk's row is untouched
    finally:
        tier.shutdown()


def test_flipped_bytes_are_failed_keys_never_wrong_bytes(tmp_path: Path) -> None:
    path = tmp_path / "kv"
    tier, arr = make_tier(path)
    keys = [key("flip", i) for i in range(3)]
    namespace = tier.namespace
    fill(arr, keys, [0, 1, 2])
    run_jobs(tier, job(1, keys, [0, 1, 2], promotion=False))
    tier.shutdown()

    ro = DiskStore(DiskConfig(path=path, num_blocks=64), chunk_model(KIB64), hash_algorithm="sha256",
                   namespace=namespace, readonly=True)
    try:
        file, offset, _size = ro.block_location(sequence_hash_of(keys[1]))  # type: ignore[misc]
    finally:
        ro.close()
    with open(os.path.join(path, file), "r+b") as f:
        f.seek(offset + 1000)
        b = f.read(1)
        f.seek(offset + 1000)
        f.write(bytes([b[0] ^ 0xFF]))

    tier, arr = make_tier(path)
    try:
        arr[:] = 0x5A
        res = run_jobs(tier, job(2, keys, [5, 6, 7], promotion=True))[2]
        assert not res.success and set(res.successful_keys) == {keys[0], keys[2]}
        assert np.array_equal(arr[5], content(keys[0], KIB64)) and np.array_equal(arr[7], content(keys[2], KIB64))
        assert (arr[6] == 0x5A).all()  # the corrupt chunk's bytes never reached the primary tier
        assert tier.lookup(keys[1], ReqContext(req_id="r")) is LookupResult.MISS  # removed
        flat = tier.get_stats().reduce()  # type: ignore[union-attr]
        assert flat["vllm:kv_offload_tiered_kv_corrupt_chunks"] == 1
        assert flat["vllm:kv_offload_tiered_kv_load_failed_chunks"] == 1
        assert tier.metrics()["offload"]["corrupt_blocks"] >= 1
    finally:
        tier.shutdown()


def test_capacity_is_bounded_and_removals_are_events(tmp_path: Path) -> None:
    tier, arr = make_tier(tmp_path / "kv", rows=2, num_blocks=4, events=True)
    try:
        keys = [key("cap", i) for i in range(10)]
        for i in range(0, 10, 2):
            fill(arr, keys[i : i + 2], [0, 1])
            assert run_jobs(tier, job(i, keys[i : i + 2], [0, 1], promotion=False))[i].success
        assert len(tier._pool) == 4
        events = list(tier.take_events())
        stored = [k for e in events if not e.removed for k in e.keys]
        removed = [k for e in events if e.removed for k in e.keys]
        assert stored == keys
        assert sorted(removed) == sorted(keys[:6])  # ARC evicts the oldest, never-reused chunks
        assert all(e.medium is Medium.STORAGE for e in events)
        ctx = ReqContext(req_id="r")
        assert [tier.lookup(k, ctx) for k in keys] == [LookupResult.MISS] * 6 + [LookupResult.HIT] * 4
        flat = tier.get_stats().reduce()  # type: ignore[union-attr]
        assert flat["vllm:kv_offload_tiered_kv_evicted_chunks"] == 6
        assert flat["vllm:kv_offload_tiered_kv_used_chunks"] == 4
        assert list(tier.take_events()) == []
    finally:
        tier.shutdown()


def test_touch_keeps_a_chunk_through_evictions(tmp_path: Path) -> None:
    tier, arr = make_tier(tmp_path / "kv", rows=4, num_blocks=4)
    try:
        keys = [key("touch", i) for i in range(6)]
        fill(arr, keys[:4], [0, 1, 2, 3])
        run_jobs(tier, job(1, keys[:4], [0, 1, 2, 3], promotion=False))
        ctx = ReqContext(req_id="r")
        tier.touch([keys[0]], ctx)  # recently used: the oldest chunk is no longer the first to go
        fill(arr, keys[4:], [0, 1])
        run_jobs(tier, job(2, keys[4:], [0, 1], promotion=False))
        held = [tier.lookup(k, ctx) is LookupResult.HIT for k in keys]
        assert held == [True, False, False, True, True, True]
    finally:
        tier.shutdown()


def test_lookup_is_retry_while_the_chunk_is_being_stored(tmp_path: Path) -> None:
    tier, arr = make_tier(tmp_path / "kv", write_threads=1)
    gate = threading.Event()
    try:
        tier._writers.submit(gate.wait, 10)  # occupy the only writer: the store below stays queued
        k = key("retry", 0)
        fill(arr, [k], [0])
        tier.submit_store(job(1, [k], [0], promotion=False))
        assert tier.lookup(k, ReqContext(req_id="r")) is LookupResult.RETRY
        gate.set()
        tier.drain_jobs()
        assert [r.success for r in tier.get_finished_jobs()] == [True]
        assert tier.lookup(k, ReqContext(req_id="r")) is LookupResult.HIT
    finally:
        gate.set()
        tier.shutdown()


def test_shutdown_with_jobs_in_flight_through_the_manager(tmp_path: Path) -> None:
    spec = spec_with_tier(KIB64, str(tmp_path / "kv"), 256, primary_chunks=64, write_threads=1, read_threads=1)
    manager = spec.get_manager()
    region = manager.primary_tier._mmap_region
    tier = manager.secondary_tiers[0]
    gate = threading.Event()
    tier._writers.submit(gate.wait, 10)  # hold the writer so that stores are queued at shutdown
    ctx = ReqContext(req_id="busy")
    manager.on_new_request(ctx)
    keys = [key("busy", i) for i in range(48)]
    for i in range(0, 48, 4):
        out = manager.prepare_store(keys[i : i + 4], ctx)
        manager.complete_store(out.keys_to_store, ctx)  # cascades: submit_store, queued behind the gate
    assert len(manager._jobs) == 12
    threading.Timer(0.05, gate.set).start()  # released while shutdown waits
    manager.shutdown()
    assert tier._closed
    done = list(tier.get_finished_jobs())
    assert len(done) == 12  # every job reported; the queued ones as failures, nothing half-copied
    assert region.mmap_obj is None  # no view of the primary memory survived the tier


def test_shutdown_with_jobs_in_flight_reports_every_job(tmp_path: Path) -> None:
    tier, arr = make_tier(tmp_path / "kv", rows=16, read_threads=2, write_threads=2)
    keys = [key("sd", i) for i in range(16)]
    fill(arr, keys, list(range(16)))
    run_jobs(tier, job(0, keys[:8], list(range(8)), promotion=False))
    for i in range(1, 9):
        tier.submit_store(job(i, keys[8:], list(range(8, 16)), promotion=False))
        tier.submit_load(job(100 + i, keys[:8], list(range(8)), promotion=True))
    tier.shutdown()
    results = {r.job_id: r for r in tier.get_finished_jobs()}
    assert set(results) == set(range(1, 9)) | set(range(101, 109))
    tier.shutdown()  # idempotent


# ------------------------------------------------------------------------------------------ configuration
@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"path": ""}, "path"),
        ({"num_blocks": 0}, "num_blocks"),
        ({"num_blocks": "10"}, "num_blocks"),
        ({"num_blocks": None, "bytes": 100}, "bytes"),
        ({"bytes": 1 << 30}, "num_blocks"),  # both given
        ({"durability": "fast"}, "durability"),
        ({"writeback": -1}, "writeback"),
        ({"writeback": "5"}, "writeback"),
        ({"read_threads": 0}, "read_threads"),
        ({"write_threads": 1.5}, "write_threads"),
        ({"remote_url": "http://localhost:6379"}, "remote_url"),
        ({"remote_url": "redis://localhost:6379", "remote_mode": "sometimes"}, "remote_mode"),
        ({"remote_url": "redis://localhost:6379", "remote_timeout": 0}, "remote_timeout"),
        ({"locality": "MARS"}, "locality"),
        ({"nmu_blocks": 10}, "nmu_blocks"),
    ],
)
def test_bad_config_values_name_the_key(tmp_path: Path, overrides: dict[str, Any], named: str) -> None:
    entry = {**tier_entry(str(tmp_path / "kv"), 16), **overrides}
    if entry.get("num_blocks") is None:
        entry.pop("num_blocks")
    _arr, view = aligned_rows(2, KIB64)
    spec = TieringOffloadingSpec(offloading_config(KIB64))
    with pytest.raises(ValueError, match=named):
        SecondaryTierFactory.create_secondary_tier(entry, view, spec)
    assert not (tmp_path / "kv").exists()  # rejected before anything was created


def test_capacity_in_bytes_and_writeback_null(tmp_path: Path) -> None:
    entry = {**tier_entry(str(tmp_path / "kv"), 1), "bytes": 10 * KIB64 + 5, "writeback": None}
    entry.pop("num_blocks")
    _arr, view = aligned_rows(2, KIB64)
    tier = SecondaryTierFactory.create_secondary_tier(entry, view, TieringOffloadingSpec(offloading_config(KIB64)))
    try:
        assert isinstance(tier, TieredKvTier) and tier.num_blocks == 10
    finally:
        tier.shutdown()


def test_other_model_or_layout_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "kv"
    tier, arr = make_tier(path, model="org/model-a")
    keys = [key("a", i) for i in range(2)]
    fill(arr, keys, [0, 1])
    run_jobs(tier, job(1, keys, [0, 1], promotion=False))
    tier.shutdown()
    before = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}

    with pytest.raises(LayoutMismatchError, match=r"model: 'org/model-a' \(tier\) != 'org/model-b'"):
        make_tier(path, model="org/model-b")
    with pytest.raises(LayoutMismatchError, match="chunk_bytes"):
        make_tier(path, chunk=2 * KIB64, model="org/model-a")
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == before

    tier, arr = make_tier(path, model="org/model-a")
    try:
        assert [tier.lookup(k, ReqContext(req_id="r")) for k in keys] == [LookupResult.HIT] * 2
    finally:
        tier.shutdown()


def test_second_tier_on_the_same_path_in_this_process_is_refused(tmp_path: Path) -> None:
    tier, _ = make_tier(tmp_path / "kv")
    try:
        with pytest.raises(DiskTierError, match="own path"):
            make_tier(tmp_path / "kv")
    finally:
        tier.shutdown()


# ------------------------------------------------------------------------------------------ other processes
def _child(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, CHILD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def test_kill9_during_a_store_storm_leaves_nothing_torn(tmp_path: Path) -> None:
    path = tmp_path / "kv"
    capacity = 48
    child = _child("storm", str(path), str(KIB64), str(capacity))
    acked: list[int] = []
    try:
        assert child.stdout is not None
        ready = child.stdout.readline().split()
        assert ready[:1] == ["ready"], child.stderr.read() if child.stderr else ""  # type: ignore[union-attr]
        # A second process on the same path: a clear error naming the holder, and nothing changed.
        with pytest.raises(DiskTierError, match=rf"in use.*pid={ready[1]}"):
            make_tier(path, num_blocks=capacity)
        while len(acked) < 200:  # 50 jobs, several rounds of eviction, then kill mid-storm
            line = child.stdout.readline().split()
            assert line and line[0] == "ok", line
            acked.extend(int(x) for x in line[1:])
    finally:
        child.send_signal(signal.SIGKILL)
        rest, _ = child.communicate(timeout=30)
    # Acknowledgements printed before the kill, up to the last one (the pipe keeps them).
    for line in rest.splitlines():
        words = line.split()
        if words and words[0] == "ok":
            acked.extend(int(x) for x in words[1:])
    assert child.returncode == -signal.SIGKILL

    tier, arr = make_tier(path, rows=capacity, num_blocks=capacity)
    try:
        ctx = ReqContext(req_id="r")
        upto = max(acked) + 64  # chunks being stored at the kill may be present (complete) or absent, never torn
        present = [i for i in range(upto) if tier.lookup(key("storm", i), ctx) is LookupResult.HIT]
        assert 0 < len(present) <= capacity
        # The last acknowledged job is newer than anything the one job in flight at the kill could evict.
        assert set(acked[-4:]) <= set(present)
        arr[:] = 0
        res = run_jobs(tier, job(1, [key("storm", i) for i in present], list(range(len(present))), promotion=True))
        assert res[1].success
        for row, i in enumerate(present):
            assert np.array_equal(arr[row], content(key("storm", i), KIB64)), i
    finally:
        tier.shutdown()


def _load_all_through_manager(manager: Any, keys: list[bytes], ctx: ReqContext) -> None:
    """Every key is ready in the primary tier (HIT): pin them, compare their bytes, unpin."""
    assert [manager.lookup(k, ctx) for k in keys] == [LookupResult.HIT] * len(keys)
    rows = primary_rows(manager)
    load = manager.prepare_load(keys, ctx)
    for k, cid in zip(keys, load.chunk_ids, strict=True):
        assert np.array_equal(rows[int(cid)], content(k, KIB64))
    manager.complete_load(keys, ctx)


def redis_server_or_none(workdir: Path) -> Any:
    try:
        from remote import redis_servers
    except ImportError:
        return None
    return None if redis_servers.missing_reason() is not None else redis_servers.RedisServer(workdir)


def test_a_new_process_restarts_warm_and_a_second_node_shares_through_redis(tmp_path: Path) -> None:
    """Node A (a child process) stores chunks through vLLM's manager and exits cleanly. This process then
    (1) as node B, on its own path, finds them through Redis (when redis-server is installed), and
    (2) restarting node A's tier, HITs and loads identical bytes."""
    server = redis_server_or_none(tmp_path / "redis")
    try:
        node_a = tmp_path / "node-a"
        args = ["store", str(node_a), str(KIB64), "8", "warm"] + ([server.url] if server is not None else [])
        child = _child(*args)
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0 and out.strip().endswith("done"), err[-3000:]
        keys = [key("warm", i) for i in range(8)]

        if server is not None:
            spec = spec_with_tier(KIB64, str(tmp_path / "node-b"), 64, primary_chunks=8, remote_url=server.url)
            manager = spec.get_manager()
            try:
                tier = manager.secondary_tiers[0]
                ctx = ReqContext(req_id="b")
                manager.on_new_request(ctx)
                # Missing on this node's disk: looked up in Redis in the background (RETRY), then fetched.
                assert [manager.lookup(k, ctx) for k in keys] == [LookupResult.RETRY] * 8
                tier.drain_jobs()
                assert [manager.lookup(k, ctx) for k in keys] == [LookupResult.HIT_PENDING] * 8
                manager.on_schedule_end(END_STEP)
                tier.drain_jobs()
                _load_all_through_manager(manager, keys, ctx)
                # A chunk nobody stored is a MISS once Redis has answered.
                other = key("warm", 99)
                assert manager.lookup(other, ctx) is LookupResult.RETRY
                tier.drain_jobs()
                assert manager.lookup(other, ctx) is LookupResult.MISS
                flat = tier.get_stats().reduce()  # type: ignore[union-attr]
                assert flat["vllm:kv_offload_tiered_kv_remote_hits"] == 8
            finally:
                gc.collect()
                manager.shutdown()

        spec = spec_with_tier(KIB64, str(node_a), 32, primary_chunks=8)  # a restart, without Redis this time
        manager = spec.get_manager()
        try:
            ctx, first = promote(manager, keys)
            assert first == [LookupResult.HIT_PENDING] * 8
            _load_all_through_manager(manager, keys, ctx)
        finally:
            gc.collect()
            manager.shutdown()
    finally:
        if server is not None:
            server.close()
