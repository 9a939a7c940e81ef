"""TieredKvTier vs vLLM 0.33's own file tier (FileSystemTierManager), side by side in one run on the same buffer.

Both tiers are vLLM secondary tiers driven through the SecondaryTierManager API exactly as vLLM's
TieringOffloadingManager drives them (submit_store / submit_load jobs of ``--job-chunks`` chunks, completion via
get_finished_jobs, lookup per key), over one page-aligned primary buffer, with the same number of I/O threads.

Measures:
  * store GB/s and load GB/s for 2 MiB and 64 KiB chunks (loads go into other chunk ids and are compared
    byte for byte with what was stored). TieredKvTier checksums every chunk, writes slab files and commits an LMDB
    registry (durability "batch": synced at least every second); the file tier writes one file per chunk and
    never fsyncs.
  * lookup cost per key: TieredKvTier answers from its in-memory index; the file tier answers RETRY, probes the
    file system on a background thread, and answers on a later call: its figure is the time to a verdict.
  * time to the first HIT after a restart with ``--restart-chunks`` stored chunks (a new tier object on the same
    directory, in this process: open + first lookup).

Usage:
    python tools/bench_vllm.py [--dir DIR] [--mib 512] [--threads 4] [--job-chunks 16] [--restart-chunks 100000]
                               [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

try:
    from vllm.v1.kv_offload.base import LookupResult, ReqContext, ScheduleEndContext, make_offload_key
    from vllm.v1.kv_offload.config import (
        OffloadingCacheConfig,
        OffloadingConfig,
        OffloadingGroupConfig,
        OffloadingModelConfig,
        OffloadingParallelConfig,
    )
    from vllm.v1.kv_offload.tiering.base import SecondaryTierManager, TransferJob
    from vllm.v1.kv_offload.tiering.fs.manager import FileSystemTierManager
    from vllm.v1.kv_offload.tiering.spec import TieringOffloadingSpec
except ImportError:
    sys.exit("bench_vllm needs vLLM 0.33's offloading modules: run tools/install_vllm.sh first")

from tiered_kv.integrations.vllm import TieredKvTier

END_STEP = ScheduleEndContext(new_req_ids=(), preempted_req_ids=())
CTX = ReqContext(req_id="bench")


def spec_for(chunk: int) -> TieringOffloadingSpec:
    cfg = OffloadingConfig(
        groups=(OffloadingGroupConfig(tokens_per_block=16, layer_names=("layers.0",), group_id=0),),
        worker_kv_bytes_per_block=chunk,
        enable_kv_cache_events=False,
        extra_config={"cpu_bytes_to_use": chunk},
        engine_id=f"bench-{uuid.uuid4().hex}",
        model=OffloadingModelConfig(name="bench/model", dtype="bfloat16"),
        cache=OffloadingCacheConfig(tokens_per_hash=16, blocks_per_chunk=1),
        parallel=OffloadingParallelConfig(
            rank=0, world_size=1, tp_size=1, pp_size=1, pcp_size=1, dcp_size=1, data_parallel_index=0,
            data_parallel_size=1, data_parallel_rank_local=None, is_parallelism_agnostic=False,
        ),
    )
    return TieringOffloadingSpec(cfg)


def aligned(num: int, chunk: int) -> np.ndarray:
    raw = np.empty(num * chunk + mmap.PAGESIZE, dtype=np.uint8)
    skip = (-raw.ctypes.data) % mmap.PAGESIZE
    return raw[skip : skip + num * chunk].reshape(num, chunk)


def keys_for(tag: str, n: int) -> list[bytes]:
    return [make_offload_key(hashlib.sha256(f"{tag}/{i}".encode()).digest(), 0) for i in range(n)]


class Job:
    counter = 0

    @classmethod
    def make(cls, keys: list[bytes], ids: list[int], promotion: bool) -> TransferJob:
        cls.counter += 1
        return TransferJob(cls.counter, keys, np.array(ids, dtype=np.int32), promotion, CTX)  # type: ignore[arg-type]


def run(tier: SecondaryTierManager, keys: list[bytes], ids: list[int], per_job: int, promotion: bool) -> float:
    """Submit all jobs at once (as a busy scheduler step does), wait until every one is reported; seconds."""
    t0 = time.perf_counter()
    submitted = 0
    for i in range(0, len(keys), per_job):
        j = Job.make(keys[i : i + per_job], ids[i : i + per_job], promotion)
        (tier.submit_load if promotion else tier.submit_store)(j)
        submitted += 1
    tier.drain_jobs()
    results = list(tier.get_finished_jobs())
    dt = time.perf_counter() - t0
    failed = [r.job_id for r in results if not r.success]
    if len(results) != submitted or failed:
        raise SystemExit(f"{type(tier).__name__}: {len(results)}/{submitted} jobs reported, failed: {failed[:5]}")
    return dt


def lookup_cost(tier: SecondaryTierManager, keys: list[bytes], want: LookupResult) -> float:
    """Seconds per key until every key has its verdict (RETRY answers are asked again after a step end)."""
    t0 = time.perf_counter()
    pending = list(keys)
    while pending:
        answers = [tier.lookup(k, CTX) for k in pending]  # type: ignore[arg-type]
        wrong = [a for a in answers if a not in (want, LookupResult.RETRY)]
        if wrong:
            raise SystemExit(f"{type(tier).__name__}: lookup answered {wrong[0]} instead of {want}")
        pending = [k for k, a in zip(pending, answers) if a is LookupResult.RETRY]
        if pending:
            tier.on_schedule_end(END_STEP)
            time.sleep(0.0005)
    return (time.perf_counter() - t0) / len(keys)


def make_ours(spec: Any, view: memoryview, path: str, threads: int, capacity: int) -> TieredKvTier:
    return TieredKvTier(spec, view, "TieredKvTier", path=path, num_blocks=capacity, read_threads=threads,
                        write_threads=threads)


def make_fs(spec: Any, view: memoryview, path: str, threads: int, capacity: int) -> FileSystemTierManager:
    return FileSystemTierManager(spec, view, "fs", root_dir=path, n_read_threads=threads, n_write_threads=threads)


MAKERS: dict[str, Callable[..., SecondaryTierManager]] = {"tiered_kv": make_ours, "vllm_fs": make_fs}


def bench_chunk(base: str, chunk: int, args: argparse.Namespace) -> dict[str, Any]:
    n = max(1, (args.mib << 20) // chunk)
    buf = aligned(2 * n, chunk)
    rng = np.random.default_rng(chunk)
    buf[:n] = rng.integers(0, 256, size=(n, chunk), dtype=np.uint8)
    view = memoryview(buf)
    spec = spec_for(chunk)
    src, dst = list(range(n)), list(range(n, 2 * n))
    out: dict[str, Any] = {"chunk_bytes": chunk, "chunks": n, "bytes": n * chunk}
    tiers = {name: make(spec, view, os.path.join(base, f"{name}-{chunk}"), args.threads, n * (args.repeat + 1))
             for name, make in MAKERS.items()}
    stores: dict[str, list[float]] = {name: [] for name in tiers}
    loads: dict[str, list[float]] = {name: [] for name in tiers}
    try:
        for r in range(args.repeat):
            # Alternate which tier goes first: on a shared machine, noise then hits both alike.
            order = list(tiers) if r % 2 == 0 else list(reversed(tiers))
            for name in order:
                tier = tiers[name]
                keys = keys_for(f"{name}/{chunk}/{r}", n)
                stores[name].append(run(tier, keys, src, args.job_chunks, promotion=False))
                buf[n:] = 0
                loads[name].append(run(tier, keys, dst, args.job_chunks, promotion=True))
                if not np.array_equal(buf[n:], buf[:n]):
                    raise SystemExit(f"{name}: loaded bytes differ from stored bytes")
        gb = n * chunk / 1e9
        for name, tier in tiers.items():
            m = min(n, 4096)
            # One round per stored key set (fresh keys each round: no answer cached by a previous round); median.
            hits = [lookup_cost(tier, keys_for(f"{name}/{chunk}/{r}", m), LookupResult.HIT) for r in range(args.repeat)]
            misses = [lookup_cost(tier, keys_for(f"{name}/{chunk}/absent{r}", m), LookupResult.MISS)
                      for r in range(args.repeat)]
            out[name] = {
                "store_gbps": gb / statistics.median(stores[name]),
                "load_gbps": gb / statistics.median(loads[name]),
                "store_s": stores[name],
                "load_s": loads[name],
                "lookup_hit_us": statistics.median(hits) * 1e6,
                "lookup_miss_us": statistics.median(misses) * 1e6,
            }
    finally:
        for tier in tiers.values():
            tier.shutdown()
    del view
    return out


def bench_restart(base: str, args: argparse.Namespace) -> dict[str, Any]:
    chunk = 4096
    n = args.restart_chunks
    per = 1024
    buf = aligned(per, chunk)
    buf[:] = np.random.default_rng(1).integers(0, 256, size=buf.shape, dtype=np.uint8)
    view = memoryview(buf)
    spec = spec_for(chunk)
    out: dict[str, Any] = {"chunk_bytes": chunk, "chunks": n}
    for name, make in MAKERS.items():
        path = os.path.join(base, f"{name}-restart")
        keys = keys_for("restart", n)
        tier = make(spec, view, path, args.threads, n)
        t0 = time.perf_counter()
        try:
            for i in range(0, n, per):
                run(tier, keys[i : i + per], list(range(len(keys[i : i + per]))), args.job_chunks * 16, False)
        finally:
            tier.shutdown()
        fill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        tier = make(spec, view, path, args.threads, n)
        try:
            first = keys[n // 2]
            while tier.lookup(first, CTX) is not LookupResult.HIT:  # type: ignore[arg-type]
                tier.on_schedule_end(END_STEP)
                time.sleep(0.0002)
            first_hit = time.perf_counter() - t0
        finally:
            tier.shutdown()
        out[name] = {"first_hit_s": first_hit, "fill_s": fill_s}
        shutil.rmtree(path, ignore_errors=True)
    del view
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=None, help="directory for both tiers (default: a temp dir under /tmp)")
    p.add_argument("--mib", type=int, default=512, help="data per measurement and chunk size (MiB)")
    p.add_argument("--threads", type=int, default=4, help="I/O threads of each tier (reads and writes each)")
    p.add_argument("--job-chunks", type=int, default=16, help="chunks per store/load job")
    p.add_argument("--restart-chunks", type=int, default=100_000, help="chunks stored before the restart (0: skip)")
    p.add_argument("--repeat", type=int, default=3, help="store/load rounds per tier (median reported)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)

    base = tempfile.mkdtemp(prefix="bench-vllm-", dir=args.dir)
    try:
        results: dict[str, Any] = {
            "config": {k: v for k, v in vars(args).items() if k != "json"},
            "chunks": [bench_chunk(base, c, args) for c in (2 << 20, 64 << 10)],
        }
        if args.restart_chunks:
            results["restart"] = bench_restart(base, args)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    if args.json:
        print(json.dumps(results))
        return 0
    rows = []
    for r in results["chunks"]:
        size = f"{r['chunk_bytes'] >> 10} KiB" if r["chunk_bytes"] < 1 << 20 else f"{r['chunk_bytes'] >> 20} MiB"
        ours, fs = r["tiered_kv"], r["vllm_fs"]
        for what, unit, key, higher in (
            ("store", "GB/s", "store_gbps", True),
            ("load", "GB/s", "load_gbps", True),
            ("lookup (hit)", "us/key", "lookup_hit_us", False),
            ("lookup (miss)", "us/key", "lookup_miss_us", False),
        ):
            ratio = ours[key] / fs[key] if higher else fs[key] / ours[key]
            rows.append((f"{size} chunks", f"{what} {unit}", ours[key], fs[key], ratio))
    if "restart" in results:
        r = results["restart"]
        ours, fs = r["tiered_kv"], r["vllm_fs"]
        rows.append((f"{r['chunks']} x 4 KiB", "first HIT after restart s", ours["first_hit_s"], fs["first_hit_s"],
                     fs["first_hit_s"] / ours["first_hit_s"]))
        rows.append((f"{r['chunks']} x 4 KiB", f"storing {r['chunks']} chunks s", ours["fill_s"], fs["fill_s"],
                     fs["fill_s"] / ours["fill_s"]))
    print(f"{'':<18} {'measure':<28} {'TieredKvTier':>13} {'vLLM fs tier':>13} {'ours vs fs':>11}")
    for a, b, x, y, ratio in rows:
        print(f"{a:<18} {b:<28} {x:>13.4g} {y:>13.4g} {ratio:>10.2f}x")
    print("ratio > 1: TieredKvTier better (faster, or cheaper per key)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
