"""All of tiered_kv's figures in one table, each against a baseline measured in the same run.

    python tools/bench.py [--quick] [--json]

Runs the individual benchmarks (each also runnable on its own, with --json):
  tools/bench_hashing.py   hashing 128k tokens vs a naive chained sha256(pickle) loop
  tools/bench_pool.py      pool bookkeeping vs a dict + OrderedDict pool; eviction policy cost
  tools/bench_disk.py      disk tier write/read vs fio (O_DIRECT psync and libaio iodepth 16) in the same directory
  tools/bench_paths.py     the public paths (disk pool write, a fresh manager's match, allocate under a storm,
                           swaps, bookkeeping) beside the store alone, fio and a plain tensor copy
  tools/bench_writeback.py what the background writeback costs: the storm (and the demo) with it on and off
  tools/bench_ttft.py      TTFT with the prefix restored from disk after a restart vs a full prefill
  tools/bench_offload.py   promotion latency, churn, and (CUDA only) host<->device vs a plain pinned copy
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent


def run(tool: str, *args: str) -> Any:
    """Run one benchmark tool with --json and return its parsed output (None if it failed)."""
    proc = subprocess.run([sys.executable, str(HERE / tool), *args, "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{tool} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    text = proc.stdout.strip()
    try:
        return json.loads(text)  # pretty-printed
    except json.JSONDecodeError:
        return json.loads(text.splitlines()[-1])  # one JSON object on the last line


def rows(quick: bool) -> list[tuple[str, str, str, float | None]]:
    """(figure, value, baseline, ratio) rows."""
    out: list[tuple[str, str, str, float | None]] = []
    h = run("bench_hashing.py", *(["--repeat", "5"] if quick else []))
    if h:
        naive = next(r for r in h["rows"] if r["impl"].startswith("naive"))
        for r in h["rows"]:
            if r["impl"].startswith("tiered_kv"):
                out.append((f"hash 128k tokens, {r['impl'].split()[1]}, {r['input']}",
                            f"{r['tokens_per_s'] / 1e6:.0f} Mtok/s",
                            f"naive {naive['tokens_per_s'] / 1e6:.0f} Mtok/s", r["speedup"]))
    p = run("bench_pool.py", *(["--blocks", "16000"] if quick else []))
    if p:
        naive = p[0]["value"]
        for r in p[1:]:
            if r["unit"] == "blocks/s":
                out.append((r["name"], f"{r['value']:,.0f} blocks/s", f"naive {naive:,.0f}", r["ratio"]))
            else:
                out.append((r["name"], f"{r['value']:.2f} us", "", None))
    d = run("bench_disk.py", "--quick")
    if d:
        for size, v in d["blocks"].items():
            for op in ("write", "read"):
                ours = v["store"][f"{op}_MBps"]
                base = (v.get("fio_psync") or {}).get(f"{op}_MBps")
                aio = (v.get("fio_libaio16") or {}).get(f"{op}_MBps")
                extra = f", libaio16 {aio:,.0f} ({ours / aio:.2f}x)" if aio else ""
                out.append((f"disk {op} {size} blocks", f"{ours:,.0f} MB/s",
                            f"fio psync {base:,.0f} MB/s{extra}" if base else "fio missing",
                            ours / base if base else None))
        for mode, rps in d.get("registry_rows_per_s", {}).items():
            out.append((f"registry group commit ({mode})", f"{rps:,.0f} rows/s", "", None))
    pp = run("bench_paths.py", *(["--quick", "--repeat", "1"] if quick else []))
    if pp:
        for size in ("2MiB", "64KiB"):
            r = pp[f"disk_{size}"]
            for op in ("write", "read"):
                pub, store = r[f"public_{op}_MBps"]["median"], r[f"store_{op}_MBps"]["median"]
                fio = r.get(f"fio_{op}_MBps")
                base = f"store alone {store:,.0f} MB/s" + (f", fio psync {fio['median']:,.0f}" if fio else "")
                what = ("disk pool register + flush" if op == "write" else "fresh manager's match, disk -> host")
                out.append((f"public {op} {size}: {what}", f"{pub:,.0f} MB/s", base, pub / store))
        for key, what in (("allocate_storm", "one sequence"), ("allocate_storm_chains", "a new sequence per round")):
            st = pp.get(key)
            if st is None:
                continue
            out.append((f"allocate_blocks(4), 2 MiB blocks churning through device 16 / host 32 / disk 512, {what}",
                        f"p50 {st['p50_ms']:.2f} ms, p99 {st['p99_ms']:.2f} ms",
                        f"{st['dropped_demotions']} dropped, {st.get('reaped', 0)} reaped", None))
        sw = pp["swap_256KiB"]
        for k in ("swap_in", "swap_out"):
            out.append((f"{k}, 64 blocks of 256 KiB (CPU tensors)", f"{sw[f'{k}_GBps']:.1f} GB/s",
                        f"one plain tensor copy {sw['plain_copy_GBps']:.1f} GB/s",
                        sw[f"{k}_GBps"] / sw["plain_copy_GBps"]))
        bk = pp["bookkeeping"]
        out.append(("bookkeeping through the manager's pool (allocate 16 + register + release + match + release)",
                    f"{bk['blocks_per_s']:,.0f} blocks/s",
                    f"the API's floor in CPython (FloorPool) {bk['floor_blocks_per_s']:,.0f} blocks/s",
                    bk["blocks_per_s"] / bk["floor_blocks_per_s"]))
    wb = run("bench_writeback.py", *(["--pairs", "1", "--rounds", "200"] if quick else []))
    if wb:
        off, on = wb["storm"]["off"]["p99_ms"]["median"], wb["storm"]["on"]["p99_ms"]["median"]
        out.append(("allocate_blocks(4) p99 under the 2 MiB storm with writeback_s=5 (off/on pairs)",
                    f"{on:.2f} ms", f"writeback off {off:.2f} ms", off / on))
    tr = run("bench_trace.py", *(["--limit", "1000", "--repeat", "1"] if quick else []))
    if tr:
        for trace, r in tr.items():
            ours, floor = r.get("tiered_kv_arc"), r.get("dict_lru")
            peer, policy = r.get("vllm_manager"), r.get("vllm_arc")
            if ours is None:
                continue
            base = f"dict LRU {floor['us_per_block']:.2f} us" if floor else ""
            if policy:
                base = f"its ARCCachePolicy alone {policy['us_per_block']:.2f} us; " + base
            if peer:
                us, hit = peer["us_per_block"], peer["hit_ratio"]
                base = f"vLLM CPUOffloadingManager (ARC) {us:.2f} us (hit {hit:.3f}); " + base
            out.append((f"Mooncake {trace} replay through host() match/allocate/register, ARC",
                        f"{ours['us_per_block']:.2f} us/block (hit {ours['hit_ratio']:.3f})", base,
                        peer["us_per_block"] / ours["us_per_block"] if peer else None))
    t = run("bench_ttft.py", *(["--lengths", "4096", "8192"] if quick else ["--lengths", "4096", "8192", "16384",
                                                                                "32768"]))
    if t:
        for r in t["rows"]:
            out.append((f"TTFT {r['tokens'] // 1024}k prompt, prefix from disk after restart",
                        f"{r['ttft_restore_s'] * 1e3:,.0f} ms", f"recompute {r['ttft_recompute_s'] * 1e3:,.0f} ms",
                        r["speedup"]))
    o = run("bench_offload.py")
    if o:
        for name, v in o["promotion"].items():
            out.append((f"promotion {name} ({o['block_bytes'] // 1024} KiB blocks)",
                        f"{v['per_block_us']:.0f} us/block", f"{v['GB/s']:.2f} GB/s", None))
        for c in o["churn"]:
            out.append((f"allocate under churn ({c['compute_ms_per_16_blocks']:.0f} ms compute / 16 blocks)",
                        f"p50 {c['allocate_p50_us']:.0f} us, p99 {c['allocate_p99_us']:.0f} us",
                        f"{c['dropped_demotions']} demotions dropped", None))
        cuda = o["cuda"]
        for c in cuda if isinstance(cuda, list) else []:
            if "ratio" not in c:  # skipped: no CUDA here
                continue
            out.append((f"host->device, {c['block_KiB']} KiB blocks", f"{c['tiered_kv_h2d_GB/s']:.1f} GB/s",
                        f"plain pinned copy_ {c['plain_h2d_GB/s']:.1f} GB/s", c["ratio"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a few minutes)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
               f"torch {torch.__version__}, {gpu}")
    table = rows(args.quick)
    if args.json:
        print(json.dumps({"machine": machine, "rows": [dict(zip(("figure", "value", "baseline", "ratio"), r))
                                                       for r in table]}))
        return
    print(f"machine: {machine}\n")
    print("| figure | value | baseline (same run) | ratio |\n|---|---|---|---|")
    for fig, value, base, ratio in table:
        print(f"| {fig} | {value} | {base} | {f'{ratio:.2f}x' if ratio is not None else ''} |")


if __name__ == "__main__":
    main()
