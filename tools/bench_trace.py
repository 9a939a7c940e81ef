"""Replay the Mooncake prefix traces through a pool's public API: cost per block and hit ratio, against baselines.

    python tools/bench_trace.py [--trace PATH ...] [--capacity N] [--repeat K] [--json]

Each request of a trace is a list of block ids (``hash_ids``: equal ids are equal prefix blocks). Every request is
replayed as a serving engine would drive one tier: match the longest cached prefix, allocate the missing blocks
(evicting as needed), write and register them (with their parents), release everything. Timed, per block of the
trace, in the same run:

* ``tiered_kv``: a host-only ``KvBlockManager``'s pool (``host().match_sequence_hashes / allocate_up_to / scatter /
  register_blocks / release_blocks``), ARC and LRU, with tiny blocks so that the bookkeeping is what is timed;
* ``vllm_manager``: vLLM's ``CPUOffloadingManager`` with its ARC policy, the layer its offloading connector calls,
  driven as its scheduler drives it per request: ``lookup`` each block until a miss, ``prepare_load`` / ``touch`` /
  ``complete_load`` the hits, ``prepare_store`` / ``complete_store`` the rest, ``on_request_finished`` (the peer as
  its users get it; skipped when vLLM is not installed);
* ``vllm_arc``: vLLM's ``ARCCachePolicy`` alone driven the same way: lookup, touch, evict, insert (the policy, below
  the manager: no reference counts, no request bookkeeping);
* ``dict_lru``: a plain ``OrderedDict`` LRU, the floor of what Python can do.

Hit ratio = blocks matched / blocks looked up; the implementations see the same requests and the same capacity.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from tiered_kv import KvBlockManager, KvBlockManagerConfig, LayoutConfig, ModelConfig

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"


def load(path: Path) -> list[list[int]]:
    with open(path) as f:
        return [json.loads(line)["hash_ids"] for line in f if line.strip()]


def replay_tiered(requests: list[list[int]], capacity: int, eviction: str) -> tuple[float, float]:
    """Seconds and hit ratio through the pool's public API."""
    model = ModelConfig(num_layers=1, inner_dim=8, page_size=16, dtype="float16")
    cfg = KvBlockManagerConfig(
        model=model, host=LayoutConfig(num_blocks=capacity), eviction=eviction, device_type="cpu"
    )
    with KvBlockManager(cfg) as bm:
        pool = bm.host()
        assert pool is not None
        n = pool.hash_length
        keys = [[i.to_bytes(n, "little") for i in ids] for ids in requests]
        parents = [[None, *ks[:-1]] for ks in keys]
        data = torch.zeros((max(map(len, requests)), *model.block_shape), dtype=model.torch_dtype)
        hits = looked = 0
        t0 = time.perf_counter()
        for ks, ps in zip(keys, parents):
            got = pool.match_sequence_hashes(ks)
            k = len(got)
            hits += k
            looked += len(ks)
            if k < len(ks):
                new = pool.allocate_up_to(len(ks) - k)
                if new:
                    pool.scatter(new, data[: len(new)])
                    m = len(new)
                    got += pool.register_blocks(new, ks[k : k + m], parents=ps[k : k + m])
            pool.release_blocks(got)
        elapsed = time.perf_counter() - t0
    return elapsed, hits / max(looked, 1)


def replay_dict_lru(requests: list[list[int]], capacity: int) -> tuple[float, float]:
    cache: OrderedDict[int, None] = OrderedDict()
    hits = looked = 0
    t0 = time.perf_counter()
    for ids in requests:
        k = 0
        for i in ids:
            if i not in cache:
                break
            cache.move_to_end(i)
            k += 1
        hits += k
        looked += len(ids)
        for i in ids[k:]:
            cache[i] = None
            if len(cache) > capacity:
                cache.popitem(last=False)
    return time.perf_counter() - t0, hits / max(looked, 1)


def replay_vllm_manager(requests: list[list[int]], capacity: int) -> tuple[float, float] | None:
    try:
        from vllm.v1.kv_offload.base import LookupResult, ReqContext, make_offload_key
        from vllm.v1.kv_offload.cpu.manager import CPUOffloadingManager
    except Exception:  # vLLM not installed (or not importable here)
        return None
    manager = CPUOffloadingManager(capacity, cache_policy="arc")
    keys = [[make_offload_key(i.to_bytes(16, "little"), 0) for i in ids] for ids in requests]
    hit = LookupResult.HIT
    hits = looked = 0
    t0 = time.perf_counter()
    for r, ks in enumerate(keys):
        ctx = ReqContext(req_id=str(r))
        manager.on_new_request(ctx)
        k = 0
        for key in ks:
            if manager.lookup(key, ctx) is not hit:
                break
            k += 1
        hits += k
        looked += len(ks)
        if k:
            manager.prepare_load(ks[:k], ctx)
            manager.touch(ks[:k], ctx)
            manager.complete_load(ks[:k], ctx)
        if k < len(ks):
            out = manager.prepare_store(ks[k:], ctx)
            if out is not None and out.keys_to_store:
                manager.complete_store(out.keys_to_store, ctx)
        manager.on_request_finished(ctx)
    return time.perf_counter() - t0, hits / max(looked, 1)


def replay_vllm_arc(requests: list[list[int]], capacity: int) -> tuple[float, float] | None:
    try:
        from vllm.v1.kv_offload.cpu.policies.arc import ARCCachePolicy
        from vllm.v1.kv_offload.cpu.policies.base import ChunkStatus
    except Exception:  # vLLM not installed (or not importable here)
        return None
    policy = ARCCachePolicy(capacity)
    free = list(range(capacity))
    hits = looked = 0
    t0 = time.perf_counter()
    for ids in requests:
        k = 0
        for i in ids:
            chunk = policy.get(i)
            if chunk is None or not chunk.is_ready:
                break
            k += 1
        hits += k
        looked += len(ids)
        if k:
            policy.touch(ids[:k], None)  # type: ignore[arg-type]
        missing = ids[k:]
        if missing:
            policy.on_store_miss(missing, None)  # type: ignore[arg-type]
            need = len(missing) - len(free)
            if need > 0:
                evicted = policy.evict(min(need, capacity), set(ids[:k])) or []
                free.extend(c.chunk_id for _, c in evicted)
            for i in missing[: len(free)]:
                chunk = ChunkStatus(free.pop())
                chunk.ref_cnt = 0  # stored and ready
                policy.insert(i, chunk, None)  # type: ignore[arg-type]
    return time.perf_counter() - t0, hits / max(looked, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", type=Path, nargs="*", default=sorted(TRACES.glob("*.jsonl")))
    ap.add_argument("--capacity", type=int, default=16384, help="blocks the tier holds")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None, help="replay only the first N requests of each trace")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out: dict[str, Any] = {}
    for path in args.trace:
        requests = load(path)[: args.limit]
        blocks = sum(map(len, requests))
        row: dict[str, Any] = {"requests": len(requests), "blocks": blocks}
        runs: dict[str, Any] = {
            "tiered_kv_arc": lambda r=requests: replay_tiered(r, args.capacity, "arc"),
            "tiered_kv_lru": lambda r=requests: replay_tiered(r, args.capacity, "lru"),
            "vllm_manager": lambda r=requests: replay_vllm_manager(r, args.capacity),
            "vllm_arc": lambda r=requests: replay_vllm_arc(r, args.capacity),
            "dict_lru": lambda r=requests: replay_dict_lru(r, args.capacity),
        }
        for name, fn in runs.items():
            results = [fn() for _ in range(args.repeat)]
            if results[0] is None:
                continue
            us = [t / blocks * 1e6 for t, _ in results]
            row[name] = {
                "us_per_block": statistics.median(us),
                "us_min": min(us),
                "us_max": max(us),
                "hit_ratio": results[0][1],
            }
        out[path.stem] = row
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for trace, row in out.items():
        print(f"{trace}: {row['requests']:,} requests, {row['blocks']:,} blocks, capacity {args.capacity:,}")
        base = row.get("dict_lru", {}).get("us_per_block")
        for name, r in row.items():
            if not isinstance(r, dict):
                continue
            rel = f"  {r['us_per_block'] / base:5.1f}x dict LRU" if base else ""
            print(
                f"  {name:15s} {r['us_per_block']:6.2f} us/block (min {r['us_min']:.2f}, max {r['us_max']:.2f})"
                f"  hit ratio {r['hit_ratio']:.4f}{rel}"
            )


if __name__ == "__main__":
    main()
