"""What the background writeback costs serving: the same workload with ``writeback_s=5`` and without, in pairs.

    python tools/bench_writeback.py [--pairs 5] [--demo-pairs 0] [--json]

* ``storm``: ``device.allocate_blocks(4)`` latency while 2 MiB blocks churn through device 16 / host 32 / disk
  512 (``tools/bench_paths.py``'s storm), writeback on and off back to back, ``--pairs`` times;
* ``demo`` (``--demo-pairs N``, needs the serving extra and the SmolLM2 package): ``tiered-kv demo --fresh
  --no-recompute`` with ``--writeback-s 5`` and ``none`` back to back; the summed first-serve TTFT of its turns,
  its disk write amplification and token hit rate.

Pairs alternate so that a machine whose speed drifts affects both sides alike; medians and ranges are printed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_paths import allocate_storm


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def storm_pairs(base: Path, pairs: int, rounds: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    for i in range(pairs):
        for side, wb in (("off", None), ("on", 5.0)):
            runs[side].append(allocate_storm(base, rounds, writeback_s=wb))
        print(f"storm pair {i + 1}/{pairs}: p99 off {runs['off'][-1]['p99_ms']:.1f} ms, "
              f"on {runs['on'][-1]['p99_ms']:.1f} ms", file=sys.stderr)
    return {
        side: {k: _spread([r[k] for r in rs]) for k in ("p50_ms", "p99_ms", "blocks_per_s", "dropped_demotions")}
        for side, rs in runs.items()
    }


def demo_pairs(base: Path, pairs: int, model: str | None) -> dict[str, Any]:
    runs: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    for i in range(pairs):
        for side, wb in (("off", "none"), ("on", "5")):
            out = base / f"demo-{side}.json"
            cmd = [sys.executable, "-c", "from tiered_kv.cli import main; main()", "demo", "--fresh",
                   "--no-recompute", "--path", str(base / f"demo-{side}"), "--json", str(out), "--writeback-s", wb]
            if model:
                cmd += ["--model", model]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            totals = json.loads(out.read_text())["totals"]
            runs[side].append({
                "ttft_sum_s": totals["ttft_first_s"],
                "disk_write_amplification": totals.get("disk_write_amplification") or 0.0,
                "token_hit_rate": totals["token_hit_rate"],
            })
        print(f"demo pair {i + 1}/{pairs}: TTFT sum off {runs['off'][-1]['ttft_sum_s']:.2f} s, "
              f"on {runs['on'][-1]['ttft_sum_s']:.2f} s", file=sys.stderr)
    return {side: {k: _spread([r[k] for r in rs]) for k in rs[0]} for side, rs in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=5, help="storm pairs (writeback off, then on)")
    ap.add_argument("--rounds", type=int, default=800, help="allocations per storm run")
    ap.add_argument("--demo-pairs", type=int, default=0, help="demo pairs (minutes each; 0: skip)")
    ap.add_argument("--demo-model", default=None, help="the demo's --model (default: SmolLM2; tiny: a quick check)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-writeback-", dir="."))
    try:
        results: dict[str, Any] = {"storm": storm_pairs(base, args.pairs, args.rounds)}
        if args.demo_pairs:
            results["demo"] = demo_pairs(base, args.demo_pairs, args.demo_model)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=1))
        return
    s = results["storm"]
    for key, unit in (("p50_ms", "ms"), ("p99_ms", "ms"), ("blocks_per_s", "blocks/s")):
        off, on = s["off"][key], s["on"][key]
        print(f"storm {key}: writeback off {off['median']:.2f} {unit} [{off['min']:.2f}-{off['max']:.2f}]  "
              f"on {on['median']:.2f} [{on['min']:.2f}-{on['max']:.2f}]  ({on['median'] / off['median']:.2f}x)")
    if "demo" in results:
        d = results["demo"]
        off, on = d["off"]["ttft_sum_s"], d["on"]["ttft_sum_s"]
        print(f"demo summed TTFT: writeback off {off['median']:.2f} s [{off['min']:.2f}-{off['max']:.2f}]  "
              f"on {on['median']:.2f} s [{on['min']:.2f}-{on['max']:.2f}]  ({on['median'] / off['median']:.3f}x); "
              f"write amplification on {d['on']['disk_write_amplification']['median']:.3f}")


if __name__ == "__main__":
    main()
