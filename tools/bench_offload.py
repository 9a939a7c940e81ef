"""Offload figures: promotion latency (host->device, disk->device), demotion throughput, allocate latency under
churn, and (with CUDA) host<->device GB/s against a plain pinned ``tensor.copy_`` measured in the same run.

    python tools/bench_offload.py [--dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from typing import Any

import torch

from tiered_kv import DiskConfig, KvBlockManager, KvBlockManagerConfig, LayoutConfig, ModelConfig

# 256 KiB blocks: 8 layers x 2 x 16 tokens x 512 x fp16
MODEL = ModelConfig(num_layers=8, inner_dim=512, page_size=16, dtype="float16")


def _fill_and_register(bm: KvBlockManager, hashes: list[bytes], batch: int = 16) -> None:
    pool = bm.top
    for i in range(0, len(hashes), batch):
        part = hashes[i : i + batch]
        blocks = pool.allocate_blocks(len(part))
        data = torch.randn((len(part), *MODEL.block_shape)).to(MODEL.torch_dtype)
        pool.scatter(blocks, data)
        pool.release_blocks(pool.register_blocks(blocks, part))


def promotion(tier: str, tmp: str, batches: tuple[int, ...] = (1, 16, 64)) -> dict[str, Any]:
    """Median seconds to promote a batch of N blocks from ``tier`` to the device tier."""
    out: dict[str, Any] = {}
    for n in batches:
        kw: dict[str, Any] = {"device": LayoutConfig(num_blocks=256)}
        if tier == "host":
            kw["host"] = LayoutConfig(num_blocks=1024)
        else:
            kw["disk"] = DiskConfig(path=f"{tmp}/promo-{n}", num_blocks=1024, backend="posix", durability="none")
        with KvBlockManager(KvBlockManagerConfig(model=MODEL, device_type="cpu", **kw)) as bm:
            lower = bm.host() if tier == "host" else bm.disk()
            assert lower is not None
            times = []
            for rep in range(7):
                hs = bm.sequence_hashes(list(range(rep * 100_000, rep * 100_000 + n * MODEL.page_size)))
                blocks = lower.allocate_blocks(n)
                lower.scatter(blocks, torch.randn((n, *MODEL.block_shape)).to(MODEL.torch_dtype))
                lower.release_blocks(lower.register_blocks(blocks, hs))
                if tier == "disk":
                    bm.flush()
                t0 = time.perf_counter()
                got = bm.match_sequence_hashes(hs)
                times.append(time.perf_counter() - t0)
                assert len(got) == n
                bm.top.release_blocks(got)
            med = statistics.median(times)
            out[f"{tier}->device x{n}"] = {"batch_s": med, "per_block_us": med / n * 1e6,
                                           "GB/s": n * MODEL.block_size_bytes / med / 1e9}
    return out


def demotion_and_allocate(tmp: str, compute_s: float = 0.0) -> dict[str, Any]:
    """Register a stream of blocks through a small device tier; demotion throughput and allocate latency.

    ``compute_s``: simulated model time per batch of 16 blocks (a prefill chunk); 0 is a pure write storm.
    """
    cfg = KvBlockManagerConfig(
        model=MODEL, device=LayoutConfig(num_blocks=128), host=LayoutConfig(num_blocks=512),
        disk=DiskConfig(path=f"{tmp}/demote-{compute_s}", num_blocks=8192, backend="posix", durability="batch"),
        device_type="cpu",
    )
    n_blocks = 3008  # a multiple of the batch
    with KvBlockManager(cfg) as bm:
        hs = bm.sequence_hashes(list(range(n_blocks * MODEL.page_size)))
        data = torch.randn((16, *MODEL.block_shape)).to(MODEL.torch_dtype)
        lat = []
        t0 = time.perf_counter()
        for i in range(0, n_blocks, 16):
            a = time.perf_counter()
            blocks = bm.top.allocate_blocks(16)
            lat.append(time.perf_counter() - a)
            bm.top.scatter(blocks, data)
            bm.top.release_blocks(bm.top.register_blocks(blocks, hs[i : i + 16]))
            if compute_s:
                time.sleep(compute_s)
        serve = time.perf_counter() - t0
        bm.flush()
        total = time.perf_counter() - t0
        m = bm.metrics()["offload"]
    lat.sort()
    return {
        "compute_ms_per_16_blocks": compute_s * 1e3,
        "blocks": n_blocks,
        "serving_blocks_per_s": n_blocks / serve,
        "demotions": m["demotions"],
        "dropped_demotions": m["dropped_demotions"],
        "demotion_GB/s": m["bytes_demoted"] / total / 1e9,
        "allocate_p50_us": lat[len(lat) // 2] * 1e6,
        "allocate_p99_us": lat[int(len(lat) * 0.99)] * 1e6,
    }


def cuda_copy(model: ModelConfig = MODEL, n: int = 256) -> dict[str, Any]:
    """host<->device GB/s through tiered_kv vs a plain pinned tensor.copy_ (CUDA only)."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA"}
    cfg = KvBlockManagerConfig(model=model, device=LayoutConfig(num_blocks=n), host=LayoutConfig(num_blocks=n),
                               device_type="cuda")
    with KvBlockManager(cfg) as bm:
        host = bm.host()
        assert host is not None
        hs = bm.sequence_hashes(list(range(n * model.page_size)))
        blocks = host.allocate_blocks(n)
        host.scatter(blocks, torch.randn((n, *model.block_shape)).to(model.torch_dtype))
        hb = host.register_blocks(blocks, hs)
        bm.top.release_blocks(bm.swap_in(hb[:4]))  # warm-up: the copy stream is created on first use
        bm.trigger_eviction("aggressive")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        db = bm.swap_in(hb)
        torch.cuda.synchronize()
        up = time.perf_counter() - t0
        bm.top.release_blocks(db)
        host.release_blocks(hb)
    src = torch.empty((n, *model.block_shape), dtype=model.torch_dtype, pin_memory=True)
    dst = torch.empty_like(src, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    plain = time.perf_counter() - t0
    nbytes = n * model.block_size_bytes
    return {"block_KiB": model.block_size_bytes // 1024, "blocks": n, "tiered_kv_h2d_GB/s": nbytes / up / 1e9,
            "plain_h2d_GB/s": nbytes / plain / 1e9, "ratio": plain / up}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None, help="directory for the disk tier (default: a temp dir)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results: dict[str, Any] = {
            "block_bytes": MODEL.block_size_bytes,
            "promotion": {**promotion("host", tmp), **promotion("disk", tmp)},
            "churn": [demotion_and_allocate(tmp, 0.0), demotion_and_allocate(tmp, 0.005)],
            "cuda": [cuda_copy(), cuda_copy(ModelConfig(num_layers=32, inner_dim=1024, page_size=16), 128)],
        }
    if args.json:
        print(json.dumps(results))
        return
    print(f"block size {MODEL.block_size_bytes // 1024} KiB")
    print(f"{'promotion':<22} {'batch ms':>9} {'us/block':>9} {'GB/s':>7}")
    for k, v in results["promotion"].items():
        print(f"{k:<22} {v['batch_s'] * 1e3:>9.2f} {v['per_block_us']:>9.1f} {v['GB/s']:>7.2f}")
    for c in results["churn"]:
        print(f"churn ({c['compute_ms_per_16_blocks']:.0f} ms compute per 16 blocks): {c['blocks']} blocks through a "
              f"128-block device tier: serving {c['serving_blocks_per_s']:,.0f} blocks/s, demotions {c['demotions']} "
              f"({c['demotion_GB/s']:.2f} GB/s incl. flush), dropped {c['dropped_demotions']}, "
              f"allocate p50 {c['allocate_p50_us']:.0f} us p99 {c['allocate_p99_us']:.0f} us")
    print(f"cuda: {results['cuda']}")


if __name__ == "__main__":
    main()
