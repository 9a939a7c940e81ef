"""Pool bookkeeping and eviction-policy cost, against a naive implementation measured in the same run.

    python tools/bench_pool.py [--blocks N] [--json]

Figures:
* blocks/s through allocate + register + release + match + release, in batches of 16, on a pool whose storage
  is a tiny tensor arena (the bookkeeping is what is timed), against a straightforward dict + OrderedDict pool;
* microseconds per block for insert / touch / evict of ARC and LRU under a skewed (Zipf-like) workload.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import OrderedDict

import torch

from tiered_kv import ModelConfig, compute_sequence_hashes
from tiered_kv.policies import create_policy
from tiered_kv.pool import BlockPool
from tiered_kv.storage.memory import TensorArena

BATCH = 16


class NaivePool:
    """What one writes first: a dict of hash -> slot, an OrderedDict LRU of inactive blocks, objects per block."""

    class Block:
        def __init__(self, slot: int, h: bytes | None = None) -> None:
            self.slot = slot
            self.hash = h

    def __init__(self, n: int) -> None:
        self.free = list(range(n))
        self.by_hash: dict[bytes, int] = {}
        self.refs: dict[int, int] = {}
        self.lru: OrderedDict[bytes, int] = OrderedDict()

    def allocate(self, k: int) -> list[Block]:
        if len(self.free) + len(self.lru) < k:
            raise RuntimeError("full")
        out = []
        for _ in range(k):
            if self.free:
                slot = self.free.pop()
            else:
                h, slot = self.lru.popitem(last=False)
                del self.by_hash[h]
            out.append(self.Block(slot))
        return out

    def register(self, blocks: list[Block], hashes: list[bytes]) -> list[Block]:
        out = []
        for b, h in zip(blocks, hashes):
            if h in self.by_hash:
                slot = self.by_hash[h]
                self.lru.pop(h, None)
                self.refs[slot] += 1
                self.free.append(b.slot)
            else:
                slot = b.slot
                self.by_hash[h] = slot
                self.refs[slot] = 1
            out.append(self.Block(slot, h))
        return out

    def release(self, blocks: list[Block]) -> None:
        for b in blocks:
            self.refs[b.slot] -= 1
            if self.refs[b.slot] == 0:
                assert b.hash is not None
                self.lru[b.hash] = b.slot

    def match(self, hashes: list[bytes]) -> list[Block]:
        out = []
        for h in hashes:
            slot = self.by_hash.get(h)
            if slot is None:
                break
            self.lru.pop(h, None)
            self.refs[slot] += 1
            out.append(self.Block(slot, h))
        return out


def workload(n_blocks: int) -> list[list[bytes]]:
    hashes = compute_sequence_hashes(list(range(n_blocks * 4)), 4, algorithm="xxh3_128")
    return [hashes[i : i + BATCH] for i in range(0, len(hashes), BATCH)]


def bench_tiered(batches: list[list[bytes]], capacity: int, policy: str) -> float:
    model = ModelConfig(num_layers=1, inner_dim=1, page_size=4, dtype="float16")
    arena = TensorArena("host", model, capacity, "fully_contiguous", "cpu")
    pool = BlockPool("host", arena, create_policy(policy, capacity), 16)
    # A block is registered once its KV is written (BlockNotComplete otherwise): one tiny scatter per batch.
    data = torch.zeros((BATCH, *model.block_shape), dtype=model.torch_dtype)
    t0 = time.perf_counter()
    for hs in batches:
        blocks = pool.allocate_blocks(len(hs))
        pool.scatter(blocks, data[: len(hs)])
        pool.release_blocks(pool.register_blocks(blocks, hs))
        pool.release_blocks(pool.match_sequence_hashes(hs))
    return time.perf_counter() - t0


def bench_naive(batches: list[list[bytes]], capacity: int) -> float:
    pool = NaivePool(capacity)
    t0 = time.perf_counter()
    for hs in batches:
        blocks = pool.allocate(len(hs))
        pool.release(pool.register(blocks, hs))
        pool.release(pool.match(hs))
    return time.perf_counter() - t0


def bench_policy(name: str, capacity: int, ops: int, seed: int = 0) -> float:
    """Microseconds per reference: hit -> touch; miss -> evict when full, then insert."""
    rng = random.Random(seed)
    keys = [int(rng.paretovariate(0.8)) for _ in range(ops)]
    policy = create_policy(name, capacity)
    t0 = time.perf_counter()
    for k in keys:
        if k in policy:
            policy.touch(k)
        else:
            if len(policy) >= capacity:
                policy.evict()
            policy.insert(k, True)
    return (time.perf_counter() - t0) / ops * 1e6


def best(fn, repeat: int = 5) -> float:  # type: ignore[no-untyped-def]
    return min(fn() for _ in range(repeat))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=64_000, help="blocks through the pool per run")
    ap.add_argument("--capacity", type=int, default=4096)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    batches = workload(args.blocks)
    n = sum(len(b) for b in batches)
    rows = []
    naive = best(lambda: bench_naive(batches, args.capacity))
    rows.append(("pool naive dict+OrderedDict", n / naive, 1.0, "blocks/s"))
    for policy in ("arc", "lru"):
        t = best(lambda p=policy: bench_tiered(batches, args.capacity, p))  # type: ignore[misc]
        rows.append((f"pool tiered_kv ({policy})", n / t, naive / t, "blocks/s"))
    for policy in ("arc", "lru"):
        us = best(lambda p=policy: bench_policy(p, 1024, 200_000), 3)  # type: ignore[misc]
        rows.append((f"policy {policy} per reference", us, None, "us"))
    if args.json:
        print(json.dumps([{"name": r[0], "value": r[1], "ratio": r[2], "unit": r[3]} for r in rows]))
        return
    print(f"{'benchmark':<34} {'value':>14} {'vs naive':>9}")
    for name, value, ratio, unit in rows:
        r = f"{ratio:.2f}x" if ratio is not None else ""
        print(f"{name:<34} {value:>12,.2f} {unit:<4} {r:>7}")


if __name__ == "__main__":
    main()
