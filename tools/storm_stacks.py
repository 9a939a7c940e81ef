"""Where does ``allocate_blocks(4)`` spend its slow calls under the 2 MiB storm of ``tools/bench_paths.py``?

    python tools/storm_stacks.py [--writeback-s none|SECONDS] [--rounds 800] [--slow-ms 5]

A sampler thread records the allocating thread's innermost frames every 0.5 ms while it is inside
``allocate_blocks``; the samples of calls slower than ``--slow-ms`` are counted by stack and the most common are
printed (a diagnostic, not a benchmark: the sampling itself costs a little).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_paths import MODELS, _data, _hashes

from tiered_kv import DiskConfig, KvBlockManager, KvBlockManagerConfig, LayoutConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--writeback-s", default="none")
    ap.add_argument("--rounds", type=int, default=800)
    ap.add_argument("--slow-ms", type=float, default=5.0)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    wb = None if args.writeback_s == "none" else float(args.writeback_s)
    model = MODELS["2MiB"]
    base = Path(tempfile.mkdtemp(prefix="storm-stacks-", dir="."))
    cfg = KvBlockManagerConfig(
        model=model, device=LayoutConfig(num_blocks=16), host=LayoutConfig(num_blocks=32),
        disk=DiskConfig(path=base / "storm", num_blocks=512, backend="posix", durability="batch", writeback_s=wb),
        device_type="cpu",
    )
    main_id = threading.get_ident()
    inside = threading.Event()
    done = threading.Event()
    current: list[str] = []

    def sample() -> None:
        while not done.is_set():
            if inside.is_set() and (frame := sys._current_frames().get(main_id)) is not None:
                stack = traceback.extract_stack(frame)[-4:]
                current.append(" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(stack)))
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    slow: collections.Counter[str] = collections.Counter()
    lat: list[float] = []
    data = _data(model, 4)
    try:
        with KvBlockManager(cfg) as bm:
            device = bm.device()
            assert device is not None
            hashes = _hashes(bm, args.rounds * 4, "storm")
            for i in range(args.rounds):
                current.clear()
                inside.set()
                t0 = time.perf_counter()
                blocks = device.allocate_blocks(4)
                dt = time.perf_counter() - t0
                inside.clear()
                lat.append(dt)
                if dt * 1e3 > args.slow_ms:
                    slow.update(current)
                device.scatter(blocks, data)
                device.release_blocks(device.register_blocks(blocks, hashes[4 * i : 4 * i + 4]))
    finally:
        done.set()
        shutil.rmtree(base, ignore_errors=True)
    lat.sort()
    n_slow = sum(1 for x in lat if x * 1e3 > args.slow_ms)
    print(f"p50 {lat[len(lat) // 2] * 1e3:.2f} ms, p99 {lat[int(len(lat) * 0.99)] * 1e3:.2f} ms; "
          f"{n_slow} of {len(lat)} calls over {args.slow_ms} ms; samples in them (0.5 ms apart):")
    for stack, count in slow.most_common(args.top):
        print(f"{count:6d}  {stack}")


if __name__ == "__main__":
    main()
