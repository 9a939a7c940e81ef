#!/usr/bin/env python
"""The paths users call, timed through the public API, each beside its baseline measured in the same run.

Rows (issue 12's measures):

* ``disk write``: a disk-only manager, ``allocate_blocks`` + ``scatter`` + ``register_blocks`` of N blocks, then
  ``flush()``; against ``DiskStore.write_blocks`` alone (the store underneath) and fio psync O_DIRECT.
* ``disk read``: a fresh host+disk manager's ``match_sequence_hashes`` of those N blocks (disk -> host); against
  ``DiskStore.read_blocks`` alone and fio psync O_DIRECT.
* ``allocate under a storm``: ``device.allocate_blocks(4)`` latency while 2 MiB blocks churn through device 16 /
  host 32 / disk 512 (every allocation evicts, every victim goes down).
* ``swap_in`` / ``swap_out`` on CPU tensors against one plain tensor copy of the same bytes.
* ``bookkeeping``: allocate 16 + register + release + match + release, blocks/s; against the same loop on
  ``FloorPool``, the least a pool with this API can do in CPython (see its docstring), in the same run.

Usage: ``python tools/bench_paths.py [--dir DIR] [--repeat N] [--quick] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_disk import _drop_cache, bench_fio

from tiered_kv import DiskConfig, KvBlockManager, KvBlockManagerConfig, LayoutConfig, ModelConfig
from tiered_kv.storage.disk import DiskStore

MODELS = {
    "2MiB": ModelConfig(num_layers=32, outer_dim=2, page_size=16, inner_dim=1024, dtype="float16"),
    "64KiB": ModelConfig(num_layers=4, outer_dim=2, page_size=16, inner_dim=256, dtype="float16"),
}


def _data(model: ModelConfig, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    return torch.randint(-1000, 1000, (n, *model.block_shape), dtype=torch.int16, generator=g).view(model.torch_dtype)


def _hashes(bm: KvBlockManager, n: int, salt: str) -> list[bytes]:
    return bm.sequence_hashes(list(range(n * bm.model.page_size)), salt=salt)


def disk_paths(directory: Path, model: ModelConfig, n: int, batch: int) -> dict[str, float]:
    """Public write (register + flush) and public read (fresh manager's match into host), MB/s."""
    path = directory / "public"
    shutil.rmtree(path, ignore_errors=True)
    data = _data(model, batch)
    disk = DiskConfig(path=path, num_blocks=n, backend="posix", durability="batch", writeback_s=None)
    cfg = KvBlockManagerConfig(model=model, disk=disk, device_type="cpu")
    with KvBlockManager(cfg) as bm:
        pool = bm.disk()
        assert pool is not None
        hashes = _hashes(bm, n, "bench")
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            k = min(batch, n - start)
            blocks = pool.allocate_blocks(k)
            pool.scatter(blocks, data[:k])
            pool.release_blocks(pool.register_blocks(blocks, hashes[start : start + k]))
        bm.flush()
        t_write = time.perf_counter() - t0
    _drop_cache(path)
    cfg = KvBlockManagerConfig(
        model=model, host=LayoutConfig(num_blocks=n), disk=disk, device_type="cpu"
    )
    with KvBlockManager(cfg) as bm:
        t0 = time.perf_counter()
        hit = bm.match_sequence_hashes(hashes)
        t_read = time.perf_counter() - t0
        assert len(hit) == n, f"matched {len(hit)} of {n}"
        bm.top.release_blocks(hit)
    shutil.rmtree(path, ignore_errors=True)
    size = n * model.block_size_bytes
    return {"write_MBps": size / t_write / 1e6, "read_MBps": size / t_read / 1e6}


def store_alone(directory: Path, model: ModelConfig, n: int, batch: int) -> dict[str, float]:
    """The store underneath: ``write_blocks`` batches + flush, then ``read_blocks`` into one aligned buffer."""
    path = directory / "store"
    shutil.rmtree(path, ignore_errors=True)
    cfg = DiskConfig(path=path, num_blocks=n, backend="posix", durability="batch")
    data = _data(model, batch)
    hashes = [i.to_bytes(32, "little") for i in range(n)]
    with DiskStore(cfg, model, hash_algorithm="sha256", namespace="bench") as store:
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            k = min(batch, n - start)
            store.write_blocks(hashes[start : start + k], list(range(start, start + k)), data[:k])
        store.flush()
        t_write = time.perf_counter() - t0
    _drop_cache(path)
    with DiskStore(cfg, model, hash_algorithm="sha256", namespace="bench") as store:
        out = store._alloc(n)
        out.view(torch.uint8).fill_(0)  # faulted in before timing, as the public read's host arena and fio's buffer
        t0 = time.perf_counter()
        _, bad = store.read_blocks(list(range(n)), out=out)
        t_read = time.perf_counter() - t0
        assert not bad
    shutil.rmtree(path, ignore_errors=True)
    size = n * model.block_size_bytes
    return {"write_MBps": size / t_write / 1e6, "read_MBps": size / t_read / 1e6}


def allocate_storm(
    directory: Path, rounds: int, writeback_s: float | None = None, chains: bool = False
) -> dict[str, float]:
    """``device.allocate_blocks(4)`` latency while 2 MiB blocks churn through device 16 / host 32 / disk 512.

    ``writeback_s``: the disk tier's background writeback (None: blocks reach the disk only when evicted).
    ``chains``: every round registers a new 4-block sequence (independent requests) instead of the next 4 blocks
    of one long sequence. One long sequence soon loses a block the disk has no room for (its ancestors fill the
    disk and stay protected), and the reaper then drops everything after it: most blocks never move down. With
    independent sequences every block must reach the disk, so the storm is bound by the disk's bandwidth.
    """
    model = MODELS["2MiB"]
    path = directory / "storm"
    shutil.rmtree(path, ignore_errors=True)
    cfg = KvBlockManagerConfig(
        model=model, device=LayoutConfig(num_blocks=16), host=LayoutConfig(num_blocks=32),
        disk=DiskConfig(path=path, num_blocks=512, backend="posix", durability="batch", writeback_s=writeback_s),
        device_type="cpu",
    )
    data = _data(model, 4)
    lat: list[float] = []
    with KvBlockManager(cfg) as bm:
        device = bm.device()
        assert device is not None
        if chains:
            per_round = [_hashes(bm, 4, f"storm-{i}") for i in range(rounds)]
        else:
            one = _hashes(bm, rounds * 4, "storm")
            per_round = [one[4 * i : 4 * i + 4] for i in range(rounds)]
        t0 = time.perf_counter()
        for i in range(rounds):
            a = time.perf_counter()
            blocks = device.allocate_blocks(4)
            lat.append(time.perf_counter() - a)
            device.scatter(blocks, data)
            device.release_blocks(device.register_blocks(blocks, per_round[i]))
        wall = time.perf_counter() - t0
        bm.flush()
        off = bm.metrics()["offload"]
        dropped = off["dropped_demotions"]
        reaped = off["reaped"]
        moved_down = off["bytes_demoted"] / (rounds * 4 * model.block_size_bytes)
    shutil.rmtree(path, ignore_errors=True)
    lat.sort()
    return {
        "bytes_down_per_byte_registered": moved_down,
        "p50_ms": lat[len(lat) // 2] * 1e3,
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3,
        "blocks_per_s": rounds * 4 / wall,
        "dropped_demotions": dropped,
        "reaped": reaped,
    }


def swaps(model: ModelConfig, n: int, repeat: int) -> dict[str, float]:
    """``swap_in`` (host -> device) and ``swap_out`` (device -> host) on CPU tensors vs a plain tensor copy."""
    cfg = KvBlockManagerConfig(
        model=model, device=LayoutConfig(num_blocks=n), host=LayoutConfig(num_blocks=n), device_type="cpu"
    )
    size = n * model.block_size_bytes
    src = _data(model, n)
    dst = torch.empty_like(src)
    dst.copy_(src)  # faulted in, as the arenas are
    plain: list[float] = []
    out: dict[str, float] = {}
    with KvBlockManager(cfg) as bm:
        device, host = bm.device(), bm.host()
        assert device is not None and host is not None
        t_in, t_out = [], []
        for r in range(repeat):
            # The baseline in every repeat, beside the swaps: this VM's copy speed drifts 2x within minutes.
            t0 = time.perf_counter()
            dst.copy_(src)
            plain.append(time.perf_counter() - t0)
            hashes = _hashes(bm, n, f"swap{r}")
            blocks = host.allocate_blocks(n)
            host.scatter(blocks, src)
            held = host.register_blocks(blocks, hashes)
            t0 = time.perf_counter()
            on_device = bm.swap_in(held)
            t_in.append(time.perf_counter() - t0)
            host.release_blocks(held)
            bm.reset(tiers=["host"])
            t0 = time.perf_counter()
            back = bm.swap_out(on_device)
            t_out.append(time.perf_counter() - t0)
            host.release_blocks(back)
            device.release_blocks(on_device)
            bm.reset()
    out["plain_copy_GBps"] = size / min(plain) / 1e9
    out["swap_in_GBps"] = size / min(t_in) / 1e9
    out["swap_out_GBps"] = size / min(t_out) / 1e9
    return out


class FloorPool:
    """The least a pool with this API can do in CPython: the bookkeeping loop's floor, not a usable pool.

    What the API's shape costs and nothing else: a handle object per block per call, each released on its own
    (one lock acquisition per call) or, if dropped, when garbage-collected (``__del__``, as the contract requires);
    a dict index, reference counts, an ``OrderedDict`` LRU of the unreferenced blocks. No eviction policy beyond
    that LRU, no parents or chain index, no checks of its arguments, no metrics or events, no data: ``scatter``
    only marks the handles written.
    """

    class Handle:
        __slots__ = ("hash", "pool", "released", "slot", "written")

        def __init__(self, pool: FloorPool, slot: int, h: bytes | None) -> None:
            self.pool = pool
            self.slot = slot
            self.hash = h
            self.released = False
            self.written = False

        def release(self) -> None:
            if not self.released:
                self.pool.release_one(self)

        def __del__(self) -> None:
            if not self.released:
                self.pool.release_one(self)

    def __init__(self, n: int) -> None:
        self.lock = threading.Lock()
        self.free = list(range(n))
        self.by_hash: dict[bytes, int] = {}
        self.refs = [0] * n
        self.lru: OrderedDict[bytes, int] = OrderedDict()

    def allocate_blocks(self, k: int) -> list[FloorPool.Handle]:
        with self.lock:
            if len(self.free) + len(self.lru) < k:
                raise RuntimeError("full")
            out = []
            for _ in range(k):
                if self.free:
                    slot = self.free.pop()
                else:
                    h, slot = self.lru.popitem(last=False)
                    del self.by_hash[h]
                out.append(self.Handle(self, slot, None))
            return out

    def scatter(self, blocks: list[FloorPool.Handle], data: object) -> None:
        for b in blocks:
            b.written = True

    def register_blocks(self, blocks: list[FloorPool.Handle], hashes: list[bytes]) -> list[FloorPool.Handle]:
        with self.lock:
            out = []
            for b, h in zip(blocks, hashes):
                b.released = True
                slot = self.by_hash.get(h)
                if slot is None:
                    slot = b.slot
                    self.by_hash[h] = slot
                    self.refs[slot] = 1
                else:
                    if not self.refs[slot]:
                        del self.lru[h]
                    self.refs[slot] += 1
                    self.free.append(b.slot)
                out.append(self.Handle(self, slot, h))
            return out

    def match_sequence_hashes(self, hashes: list[bytes]) -> list[FloorPool.Handle]:
        with self.lock:
            out = []
            for h in hashes:
                slot = self.by_hash.get(h)
                if slot is None:
                    break
                if not self.refs[slot]:
                    del self.lru[h]
                self.refs[slot] += 1
                out.append(self.Handle(self, slot, h))
            return out

    def release_one(self, b: FloorPool.Handle) -> None:
        with self.lock:
            b.released = True
            if b.hash is None:  # an unregistered allocation
                self.free.append(b.slot)
                return
            r = self.refs[b.slot] - 1
            self.refs[b.slot] = r
            if not r:
                self.lru[b.hash] = b.slot


def _bookkeeping_loop(pool: Any, hashes: list[bytes], data: torch.Tensor) -> float:
    """The issue's loop: allocate 16 + scatter + register + release each + match + release each; seconds."""
    t0 = time.perf_counter()
    for i in range(0, len(hashes), 16):
        hs = hashes[i : i + 16]
        blocks = pool.allocate_blocks(len(hs))
        pool.scatter(blocks, data[: len(hs)])  # a block is written before it counts
        for b in pool.register_blocks(blocks, hs):
            b.release()
        for b in pool.match_sequence_hashes(hs):
            b.release()
    return time.perf_counter() - t0


def bookkeeping(n_blocks: int, repeat: int = 3) -> dict[str, float]:
    """The bookkeeping loop through the manager's pool and on :class:`FloorPool`, alternating, blocks/s (best of
    ``repeat`` each; tiny blocks: bookkeeping only)."""
    model = ModelConfig(num_layers=1, inner_dim=8, page_size=16, dtype="float16")
    cfg = KvBlockManagerConfig(model=model, device=LayoutConfig(num_blocks=4096), device_type="cpu")
    data = torch.zeros((16, *model.block_shape), dtype=model.torch_dtype)
    ours: list[float] = []
    floor: list[float] = []
    for r in range(repeat):
        with KvBlockManager(cfg) as bm:
            hashes = _hashes(bm, n_blocks, f"book{r}")
            ours.append(_bookkeeping_loop(bm.top, hashes, data))
        floor.append(_bookkeeping_loop(FloorPool(4096), hashes, data))
    return {"blocks_per_s": n_blocks / min(ours), "floor_blocks_per_s": n_blocks / min(floor)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None, help="directory on the disk to measure (default: a temp dir here)")
    ap.add_argument("--repeat", type=int, default=3, help="repeats of each disk figure (medians reported)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-paths-", dir="."))
    base.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    try:
        sizes = {"2MiB": (384 if not args.quick else 96, 64), "64KiB": (8192 if not args.quick else 2048, 512)}
        for name, (n, batch) in sizes.items():
            model = MODELS[name]
            runs: dict[str, list[float]] = {}
            for rep in range(args.repeat):
                pair = (("public", disk_paths), ("store", store_alone))
                # Alternate which goes first: on this disk the run right after another write ran slower or faster
                # by up to 30%, and a fixed order biased the ratio.
                for prefix, fn in pair if rep % 2 == 0 else pair[::-1]:
                    for k, v in fn(base, model, n, batch).items():
                        runs.setdefault(f"{prefix}_{k}", []).append(v)
                fio = bench_fio(base, model.block_size_bytes, n * model.block_size_bytes, "psync", 1)
                if fio:
                    for k, v in fio.items():
                        runs.setdefault(f"fio_{k}", []).append(v)
            results[f"disk_{name}"] = {
                k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in runs.items()
            }
        results["allocate_storm"] = allocate_storm(base, 200 if args.quick else 800)
        results["allocate_storm_writeback"] = allocate_storm(base, 200 if args.quick else 800, writeback_s=5.0)
        results["allocate_storm_chains"] = allocate_storm(base, 200 if args.quick else 800, chains=True)
        results["swap_256KiB"] = swaps(ModelConfig(num_layers=8, inner_dim=1024, page_size=16, dtype="float16"),
                                       64, 15)
        results["bookkeeping"] = bookkeeping(16_000 if args.quick else 64_000)
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=1))
        return
    for name in ("2MiB", "64KiB"):
        r = results[f"disk_{name}"]
        for rw in ("write", "read"):
            pub, store = r[f"public_{rw}_MBps"], r[f"store_{rw}_MBps"]
            fio = r.get(f"fio_{rw}_MBps")
            line = (f"disk {rw} {name}: public {pub['median']:7.0f} MB/s [{pub['min']:.0f}-{pub['max']:.0f}]  "
                    f"store {store['median']:7.0f} ({pub['median'] / store['median']:.2f}x)")
            if fio:
                line += f"  fio psync {fio['median']:7.0f} ({pub['median'] / fio['median']:.2f}x)"
            print(line)
    for key, what in (("allocate_storm", "one sequence, no writeback"),
                      ("allocate_storm_writeback", "one sequence, writeback_s=5"),
                      ("allocate_storm_chains", "a new sequence per round, no writeback")):
        s = results[key]
        print(f"allocate_blocks(4) under the 2 MiB storm, {what}: p50 {s['p50_ms']:.2f} ms  p99 {s['p99_ms']:.2f} ms"
              f"  ({s['blocks_per_s']:.0f} blocks/s, {s['dropped_demotions']} dropped, {s['reaped']} reaped, "
              f"{s['bytes_down_per_byte_registered']:.2f} bytes written down per byte registered)")
    w = results["swap_256KiB"]
    print(f"swap_in {w['swap_in_GBps']:.1f} GB/s ({w['swap_in_GBps'] / w['plain_copy_GBps']:.2f}x)  "
          f"swap_out {w['swap_out_GBps']:.1f} GB/s ({w['swap_out_GBps'] / w['plain_copy_GBps']:.2f}x)  "
          f"plain copy {w['plain_copy_GBps']:.1f} GB/s")
    b = results["bookkeeping"]
    print(f"bookkeeping: {b['blocks_per_s']:,.0f} blocks/s  (the API's floor in CPython, FloorPool: "
          f"{b['floor_blocks_per_s']:,.0f} blocks/s; {b['blocks_per_s'] / b['floor_blocks_per_s']:.2f}x)")


if __name__ == "__main__":
    main()
