#!/usr/bin/env python
"""The cost of ``batch`` durability's power-loss flags, old against new, in the same run (medians of 3).

Old flags: LMDB ``MDB_NOSYNC`` (``sync=False, metasync=False``): no registry fsync, but LMDB documents that a
system crash may corrupt the environment. New flags: ``MDB_NOMETASYNC`` (``sync=True, metasync=False``): every
commit fdatasyncs LMDB's data pages (integrity kept through power loss; only the last transaction may be
undone). Switched with ``tiered_kv.storage.disk.store._BATCH_SYNCS_COMMITS``. For each it measures:

* ``registry commits/s``: one-row LMDB transactions through :class:`~tiered_kv.storage.disk.registry.Registry`
  (the raw price of a transaction; ``sync`` durability's flags shown too), next to a raw ``fdatasync`` of a
  4 KiB write in the same directory (the device's floor);
* ``write_blocks MB/s``: ``DiskStore.write_blocks`` in batches of 16 blocks of 256 KiB into a full tier, each
  batch first deleting the 16 oldest blocks and reusing their slots (the disk pool's eviction pattern: the
  deletions are group-committed, the write forces their commit before it overwrites the slots);
* ``churn blocks/s``: the same one block at a time (delete 1, write 1: the worst case, two transactions each);
* ``delete() us``: the time one ``DiskStore.delete`` call takes (what the disk pool pays under its lock per
  eviction), against the time a one-row deletion transaction takes (what it paid before deletions were
  group-committed).

Usage: ``python tools/bench_durability.py [--dir DIR] [--reps 3]``; about 20-40 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiered_kv.config import DiskConfig, ModelConfig
from tiered_kv.hashing import compute_sequence_hashes
from tiered_kv.storage.disk import DiskStore
from tiered_kv.storage.disk import store as store_module
from tiered_kv.storage.disk.registry import Registry

MODEL = ModelConfig(num_layers=4, outer_dim=2, page_size=16, inner_dim=1024, dtype="float16")  # 256 KiB blocks
CAPACITY = 256
BATCH = 16


def _hashes(tag: str, n: int) -> list[bytes]:
    return [bytes(h) for h in compute_sequence_hashes(list(range(n * MODEL.page_size)), MODEL.page_size, salt=tag)]


def fdatasync_us(directory: Path, n: int = 300) -> float:
    fd = os.open(directory / "raw", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        times = []
        for i in range(n):
            os.pwrite(fd, b"x" * 4096, (i % 64) * 4096)
            t = time.perf_counter()
            os.fdatasync(fd)
            times.append(time.perf_counter() - t)
    finally:
        os.close(fd)
    return statistics.median(times) * 1e6


def registry_commits_per_s(directory: Path, sync: bool, metasync: bool, seconds: float = 1.0) -> float:
    path = directory / "reg"
    shutil.rmtree(path, ignore_errors=True)
    reg = Registry(path, readonly=False, map_size=1 << 30, sync=sync, metasync=metasync)
    try:
        row = [0, 1, 4096, 0.0, 0.0, 0, None, None]
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            reg.commit(puts={n.to_bytes(16, "little"): row})
            n += 1
        return n / (time.perf_counter() - t0)
    finally:
        reg.close()


def _open_full(directory: Path) -> tuple[DiskStore, list[bytes]]:
    path = directory / "tier"
    shutil.rmtree(path, ignore_errors=True)
    store = DiskStore(
        DiskConfig(path=path, num_blocks=CAPACITY, backend="posix", durability="batch"), MODEL,
        hash_algorithm="sha256", namespace="bench",
    )
    live = _hashes("fill", CAPACITY)
    data = torch.zeros((BATCH, *MODEL.block_shape), dtype=MODEL.torch_dtype)
    for start in range(0, CAPACITY, BATCH):
        store.write_blocks(live[start : start + BATCH], list(range(start, start + BATCH)), data)
    store.flush()
    return store, live


def write_mb_per_s(directory: Path, batches: int = 48) -> tuple[float, float]:
    """(MB/s of write_blocks with evictions, median microseconds of one delete() call)."""
    store, live = _open_full(directory)
    try:
        data = torch.randint(-100, 100, (BATCH, *MODEL.block_shape), dtype=torch.int16).view(MODEL.torch_dtype)
        new = _hashes("new", batches * BATCH)
        delete_times = []
        t0 = time.perf_counter()
        for b in range(batches):
            victims, live = live[:BATCH], live[BATCH:]
            slots = [e.slot for e in map(store.lookup, victims) if e is not None]
            for v in victims:  # one delete per eviction, as the pool does
                t = time.perf_counter()
                store.delete([v])
                delete_times.append(time.perf_counter() - t)
            hs = new[b * BATCH : (b + 1) * BATCH]
            store.write_blocks(hs, slots, data)
            live.extend(hs)
        store.flush()
        elapsed = time.perf_counter() - t0
        return batches * BATCH * MODEL.block_size_bytes / elapsed / 1e6, statistics.median(delete_times) * 1e6
    finally:
        store.close()


def churn_blocks_per_s(directory: Path, n: int = 200) -> float:
    store, live = _open_full(directory)
    try:
        data = torch.zeros((1, *MODEL.block_shape), dtype=MODEL.torch_dtype)
        new = _hashes("churn", n)
        t0 = time.perf_counter()
        for h in new:
            victim = live.pop(0)
            entry = store.lookup(victim)
            assert entry is not None
            store.delete([victim])
            store.write_blocks([h], [entry.slot], data)
            live.append(h)
        return n / (time.perf_counter() - t0)
    finally:
        store.close()


def deletion_txn_us(directory: Path, n: int = 200) -> float:
    """Median time of a one-row deletion transaction with the new flags (what an eviction paid, synchronously)."""
    path = directory / "reg"
    shutil.rmtree(path, ignore_errors=True)
    reg = Registry(path, readonly=False, map_size=1 << 30, sync=True, metasync=False)
    try:
        row = [0, 1, 4096, 0.0, 0.0, 0, None, None]
        keys = [i.to_bytes(16, "little") for i in range(n)]
        reg.commit(puts={k: row for k in keys})
        times = []
        for k in keys:
            t = time.perf_counter()
            reg.commit(deletes=[k])
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e6
    finally:
        reg.close()


def _median(fn: Callable[[], float], reps: int) -> float:
    return statistics.median(fn() for _ in range(reps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-durability-", dir=args.dir))
    saved = store_module._BATCH_SYNCS_COMMITS
    try:
        raw = fdatasync_us(base)
        print(f"raw fdatasync of a 4 KiB write: {raw:.0f} us (median)")
        print(f"{'flags':<34}{'commits/s':>11}{'write MB/s':>12}{'churn blk/s':>13}{'delete() us':>13}")
        results = {}
        for name, sync, metasync, flag in (
            ("old batch (MDB_NOSYNC)", False, False, False),
            ("new batch (MDB_NOMETASYNC)", True, False, True),
            ("sync (reference)", True, True, None),
        ):
            commits = _median(lambda s=sync, m=metasync: registry_commits_per_s(base, s, m), args.reps)
            if flag is None:
                print(f"{name:<34}{commits:>11.0f}")
                continue
            store_module._BATCH_SYNCS_COMMITS = flag
            runs = [write_mb_per_s(base) for _ in range(args.reps)]
            mb = statistics.median(r[0] for r in runs)
            del_us = statistics.median(r[1] for r in runs)
            churn = _median(lambda: churn_blocks_per_s(base), args.reps)
            results[name] = (commits, mb, churn)
            print(f"{name:<34}{commits:>11.0f}{mb:>12.0f}{churn:>13.0f}{del_us:>13.1f}")
        (c0, m0, h0), (c1, m1, h1) = results.values()
        print(f"new/old: commits/s {c1 / c0:.2f}x, write MB/s {m1 / m0:.2f}x, churn {h1 / h0:.2f}x")
        txn = deletion_txn_us(base)
        print(f"a one-row deletion transaction with the new flags (an eviction's price before group commit): "
              f"{txn:.0f} us (median)")
    finally:
        store_module._BATCH_SYNCS_COMMITS = saved
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
