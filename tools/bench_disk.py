#!/usr/bin/env python
"""Disk tier throughput against fio, measured in the same directory in the same run.

For 2 MiB blocks (32 layers x 2 x 16 tokens x 1024 x fp16) and 64 KiB blocks it measures:

* ``DiskStore.write_blocks`` (batches, then ``flush()``) and ``DiskStore.read_blocks`` (checksum-verified);
* fio sequential write/read with ``--direct=1 --ioengine=psync`` (one request in flight: the issue's bar,
  want >= 0.9x) and ``--ioengine=libaio --iodepth=16`` (the device's real limit with requests in flight).

Then registry group commit: rows/s committed in batches, for durability "sync" and "batch".

Usage: ``python tools/bench_disk.py [--dir DIR] [--quick] [--json]``. Default run is about a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiered_kv.config import DiskConfig, ModelConfig
from tiered_kv.storage.disk import DiskStore

CONFIGS = {
    "2MiB": ModelConfig(num_layers=32, outer_dim=2, page_size=16, inner_dim=1024, dtype="float16"),
    "64KiB": ModelConfig(num_layers=4, outer_dim=2, page_size=16, inner_dim=256, dtype="float16"),
}


def _drop_cache(directory: Path) -> None:
    """Evict the tier's pages from the page cache so buffered reads hit the disk (no-op for O_DIRECT)."""
    for p in directory.glob("data-*.bin"):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_store(
    directory: Path, model: ModelConfig, total_bytes: int, batch_bytes: int, backend: str = "posix"
) -> dict[str, Any]:
    n = max(1, total_bytes // model.block_size_bytes)
    per = max(1, batch_bytes // model.block_size_bytes)
    path = directory / "store"
    shutil.rmtree(path, ignore_errors=True)
    cfg = DiskConfig(path=path, num_blocks=n, backend=backend, durability="batch")
    data = torch.randint(-100, 100, (per, *model.block_shape), dtype=torch.int16).view(model.torch_dtype)
    if backend == "kvikio":
        data = data.cuda()  # GPU memory straight to the files
    with DiskStore(cfg, model, hash_algorithm="sha256", namespace="bench") as store:
        hashes = [i.to_bytes(32, "little") for i in range(n)]
        t0 = time.perf_counter()
        for start in range(0, n, per):
            k = min(per, n - start)
            store.write_blocks(hashes[start : start + k], list(range(start, start + k)), data[:k])
        store.flush()
        t_write = time.perf_counter() - t0
        direct = store.backend.direct_io
    _drop_cache(path)
    with DiskStore(cfg, model, hash_algorithm="sha256", namespace="bench") as store:
        # Aligned destination (O_DIRECT reads land in place), or GPU memory for kvikio.
        out = torch.empty_like(data) if data.is_cuda else store._alloc(per)
        t0 = time.perf_counter()
        bad = 0
        for start in range(0, n, per):
            k = min(per, n - start)
            _, b = store.read_blocks(list(range(start, start + k)), out=out[:k])
            bad += len(b)
        t_read = time.perf_counter() - t0
    shutil.rmtree(path, ignore_errors=True)
    size = n * model.block_size_bytes
    return {
        "write_MBps": size / t_write / 1e6,
        "read_MBps": size / t_read / 1e6,
        "blocks": n,
        "direct_io": direct,
        "backend": backend,
        "corrupt": bad,
    }


def bench_fio(directory: Path, bs: int, total_bytes: int, engine: str, iodepth: int) -> dict[str, float] | None:
    if shutil.which("fio") is None:
        return None
    target = directory / "fio.dat"
    res: dict[str, float] = {}
    for rw in ("write", "read"):
        cmd = [
            "fio", "--name=bench", f"--filename={target}", f"--size={total_bytes}", f"--bs={bs}", f"--rw={rw}",
            f"--ioengine={engine}", f"--iodepth={iodepth}", "--direct=1", "--output-format=json",
        ]  # fmt: skip
        if rw == "write":
            cmd.append("--end_fsync=1")
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(f"fio failed: {proc.stderr.strip()[:500]}", file=sys.stderr)
            return None
        job = json.loads(proc.stdout[proc.stdout.index("{") :])["jobs"][0]
        res[f"{rw}_MBps"] = job[rw]["bw_bytes"] / 1e6
    target.unlink(missing_ok=True)
    return res


def bench_dd(directory: Path, bs: int, total_bytes: int) -> dict[str, float] | None:
    """Fallback baseline where fio is missing: dd with O_DIRECT is also one synchronous request at a time."""
    if shutil.which("dd") is None:
        return None
    target = directory / "dd.dat"
    count = max(1, total_bytes // bs)
    res: dict[str, float] = {}
    for rw, cmd in (
        (
            "write",
            ["dd", "if=/dev/zero", f"of={target}", f"bs={bs}", f"count={count}", "oflag=direct", "conv=fdatasync"],
        ),
        ("read", ["dd", f"if={target}", "of=/dev/null", f"bs={bs}", f"count={count}", "iflag=direct"]),
    ):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, check=False)
        dt = time.perf_counter() - t0
        if proc.returncode != 0:
            return None
        res[f"{rw}_MBps"] = count * bs / dt / 1e6
    target.unlink(missing_ok=True)
    return res


def bench_registry(directory: Path, durability: str, rows: int, batch: int) -> float:
    model = ModelConfig(num_layers=1, inner_dim=64, page_size=1, dtype="uint8")
    path = directory / f"reg-{durability}"
    shutil.rmtree(path, ignore_errors=True)
    with DiskStore(
        DiskConfig(path=path, num_blocks=rows, backend="posix", durability=durability),
        model,
        hash_algorithm="sha256",
        namespace="bench",
    ) as store:
        reg = store._registry
        assert reg is not None
        now = time.time()
        t0 = time.perf_counter()
        for start in range(0, rows, batch):
            reg.commit(puts={i.to_bytes(32, "little"): [i, i, 64, now, now, 0] for i in range(start, start + batch)})
        store.flush()
        dt = time.perf_counter() - t0
    shutil.rmtree(path, ignore_errors=True)
    return rows / dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None, help="directory on the disk to measure (default: a temp dir in .)")
    ap.add_argument("--quick", action="store_true", help="~10 s run with smaller sizes")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--backend", default="posix", choices=["posix", "kvikio"], help="DiskStore backend")
    args = ap.parse_args()
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-disk-", dir="."))
    base.mkdir(parents=True, exist_ok=True)
    total = (256 << 20) if args.quick else (2 << 30)
    total_small = (128 << 20) if args.quick else (512 << 20)
    results: dict[str, Any] = {"dir": str(base.resolve()), "blocks": {}}
    try:
        for name, model in CONFIGS.items():
            size = total if name == "2MiB" else total_small
            bs = model.block_size_bytes
            r: dict[str, Any] = {"block_bytes": bs, "total_bytes": size}
            r["store"] = bench_store(base, model, size, 64 << 20, args.backend)
            r["fio_psync"] = bench_fio(base, bs, size, "psync", 1)
            if r["fio_psync"] is None:
                r["dd_direct"] = r["fio_psync"] = bench_dd(base, bs, size)
                results["baseline"] = "dd O_DIRECT (fio missing)"
            r["fio_libaio16"] = bench_fio(base, bs, size, "libaio", 16)
            results["blocks"][name] = r
        rows = 20_000 if args.quick else 100_000
        results["registry_rows_per_s"] = {
            d: bench_registry(base, d, rows if d != "sync" else rows // 10, 64) for d in ("sync", "batch")
        }
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"disk tier ({args.backend}) vs {results.get('baseline', 'fio')} in {results['dir']}")
    print(f"{'blocks':>6} {'op':>5} {'store MB/s':>11} {'fio psync':>10} {'ratio':>6} {'fio aio16':>10} {'ratio':>6}")
    for name, r in results["blocks"].items():
        for op in ("write", "read"):
            s = r["store"][f"{op}_MBps"]
            p = (r["fio_psync"] or {}).get(f"{op}_MBps", float("nan"))
            a = (r["fio_libaio16"] or {}).get(f"{op}_MBps", float("nan"))
            print(f"{name:>6} {op:>5} {s:11.0f} {p:10.0f} {s / p:6.2f} {a:10.0f} {s / a:6.2f}")
        print(f"{'':>6} store O_DIRECT={r['store']['direct_io']} corrupt={r['store']['corrupt']}")
    for d, v in results["registry_rows_per_s"].items():
        print(f"registry group commit (64 rows/txn, durability={d}): {v:,.0f} rows/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
