"""Benchmark the remote tier: RemoteStore put/get vs plain pipelined redis-py SET/GET of the same bytes.

Both sides run in the same process against the same single Redis server, for each block size:

* ``store put``  : ``RemoteStore.put_blocks`` (tensor -> header + xxh3 checksum -> pipelined SETs, chunks of
  ``--max-batch`` in parallel);
* ``store get``  : ``RemoteStore.get_blocks`` (pipelined GETs, header + checksum verified, copied into a tensor);
* ``raw put/get``: ``redis.Redis().pipeline(transaction=False)`` SET/GET of pre-built ``bytes`` values of the
  same size, chunks of ``--max-batch``, one connection (the "plain redis-py" baseline: no header, no checksum,
  no copy into a tensor).

The ratio column is store / raw throughput (the issue asks for >= 0.8). Without ``--url`` a throw-away
``redis-server`` (no persistence) is started on a free loopback port and stopped at the end.

Usage::

    python tools/bench_remote.py [--url redis://host:port] [--block-sizes 2MiB,64KiB] [--total-mib 256]
                                 [--max-batch 64] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from tiered_kv.config import ModelConfig
from tiered_kv.storage.remote import RemoteStore

_UNITS = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "": 1}


def parse_size(text: str) -> int:
    """``"2MiB"`` -> 2097152."""
    t = text.strip().lower()
    num = t.rstrip("kmgib")
    return int(float(num) * _UNITS[t[len(num) :]])


def model_for(block_size: int) -> ModelConfig:
    """A float16 model whose block is exactly ``block_size`` bytes (32 layers x 2 x 16 tokens x inner)."""
    per_inner = 32 * 2 * 16 * 2
    if block_size % per_inner:
        raise SystemExit(f"block size {block_size} is not a multiple of {per_inner}")
    return ModelConfig(num_layers=32, inner_dim=block_size // per_inner, page_size=16, dtype="float16")


@contextlib.contextmanager
def local_server() -> Iterator[str]:
    """A throw-away redis-server on a free loopback port."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server not on PATH (apt-get install -y redis-server), or pass --url")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tempfile.mkdtemp(prefix="bench-redis-")
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import redis

        client = redis.Redis(port=port)
        for _ in range(500):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.01)
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def best_of_interleaved(
    repeats: int, setup: Callable[[], None], fns: dict[str, Callable[[], object]]
) -> dict[str, float]:
    """Fastest of ``repeats`` timed runs of each of ``fns``, run in turns (so load spikes hit all of them);
    ``setup`` runs untimed before each run."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            setup()
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def bench_size(url: str, block_size: int, total: int, max_batch: int, repeats: int) -> dict[str, Any]:
    import redis

    model = model_for(block_size)
    n = max(1, total // block_size)
    data = torch.randn((n, *model.block_shape), dtype=torch.float32).to(torch.float16)
    hashes = [i.to_bytes(4, "little") * 8 for i in range(n)]  # 32-byte "sha256" hashes
    raw_client = redis.Redis.from_url(url, socket_timeout=30)
    values = [data[i].view(torch.uint8).numpy().tobytes() for i in range(n)]
    raw_keys = [b"bench-raw:%d" % i for i in range(n)]

    def flush() -> None:
        raw_client.flushdb()

    def raw_put() -> None:
        for s in range(0, n, max_batch):
            pipe = raw_client.pipeline(transaction=False)
            for i in range(s, min(n, s + max_batch)):
                pipe.set(raw_keys[i], values[i])
            assert all(pipe.execute())

    def raw_get() -> None:
        got = 0
        for s in range(0, n, max_batch):
            pipe = raw_client.pipeline(transaction=False)
            for i in range(s, min(n, s + max_batch)):
                pipe.get(raw_keys[i])
            got += sum(v is not None for v in pipe.execute())
        assert got == n

    # A generous timeout: the benchmark measures throughput, not outage handling.
    store = RemoteStore(url, model=model, namespace="bench", hash_algorithm="sha256", timeout=10, max_batch=max_batch)
    out = torch.empty_like(data)
    try:

        def store_put() -> None:
            assert store.put_blocks(hashes, data) == n

        def store_get() -> None:
            _, ok = store.get_blocks(hashes, out=out)
            assert all(ok)

        puts = best_of_interleaved(repeats, flush, {"raw": raw_put, "store": store_put})
        store_put()
        raw_put()
        gets = best_of_interleaved(repeats, lambda: None, {"raw": raw_get, "store": store_get})
        t_raw_put, t_store_put, t_raw_get, t_store_get = puts["raw"], puts["store"], gets["raw"], gets["store"]
        assert torch.equal(out.view(torch.uint8), data.view(torch.uint8))
        metrics = store.metrics()
    finally:
        store.close()
        flush()
    nbytes = n * block_size

    def row(t: float) -> dict[str, float]:
        return {"seconds": t, "gb_per_s": nbytes / t / 1e9, "blocks_per_s": n / t}

    return {
        "block_size": block_size,
        "blocks": n,
        "bytes": nbytes,
        "store_put": row(t_store_put),
        "raw_put": row(t_raw_put),
        "store_get": row(t_store_get),
        "raw_get": row(t_raw_get),
        "put_ratio": t_raw_put / t_store_put,
        "get_ratio": t_raw_get / t_store_get,
        "store_get_latency_p50_ms": metrics["get_latency_p50_ms"],
        "corrupt": metrics["corrupt"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--url", help="redis://host:port of a server to use (default: start a local one)")
    ap.add_argument("--block-sizes", default="2MiB,64KiB")
    ap.add_argument("--total-mib", type=int, default=256, help="bytes moved per block size and direction")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    args = ap.parse_args(argv)
    sizes = [parse_size(s) for s in args.block_sizes.split(",") if s.strip()]
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(local_server())
        results = [bench_size(url, b, args.total_mib << 20, args.max_batch, args.repeats) for b in sizes]
    if args.json:
        print(json.dumps({"url": url, "max_batch": args.max_batch, "results": results}))
        return 0
    print(f"remote tier vs plain redis-py pipelines, {url}, max_batch={args.max_batch}, best of {args.repeats}")
    print(
        f"{'block':>9} {'blocks':>7} {'op':>4} {'store GB/s':>11} {'raw GB/s':>9} {'store blk/s':>12} "
        f"{'raw blk/s':>10} {'ratio':>6}"
    )
    for r in results:
        for op in ("put", "get"):
            s, raw, ratio = r[f"store_{op}"], r[f"raw_{op}"], r[f"{op}_ratio"]
            head = f"{r['block_size'] >> 10:>6}KiB {r['blocks']:>7} {op:>4}"
            rates = f"{s['gb_per_s']:>11.2f} {raw['gb_per_s']:>9.2f}"
            counts = f"{s['blocks_per_s']:>12.0f} {raw['blocks_per_s']:>10.0f}"
            print(f"{head} {rates} {counts} {ratio:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
