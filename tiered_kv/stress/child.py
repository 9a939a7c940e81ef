"""The child process of kill mode: runs the workload and journals what it claims, until it is SIGKILLed.

Run as ``python -m tiered_kv.stress.child OPTIONS_JSON LIFE JOURNAL SECONDS``. The journal is a JSON-lines file;
each line is written with one ``write`` and flushed, so a SIGKILL (which does not lose the page cache) can only
cut the line being written, which the parent ignores. Lines (``event`` field):

* ``ready``: the store is open and the clients run;
* ``durable``: hashes (hex) made durable by a checkpoint (see :mod:`tiered_kv.stress.durability`);
* ``removed``: hashes the disk tier reported removed (they are no longer required);
* ``stats``: the counters and store metrics so far (the last complete one is what this life reports);
* ``exit``: a clean end, with ``reason`` "done" (time is up) or "full" (the disk tier reached the epoch limit).

Kill mode must never let the disk tier evict (an eviction just before a kill could not be journaled in time
and would look like a loss), so a watcher stops the workload when the tier holds ``epoch_limit`` blocks: the
headroom left covers every block that can still reach the disk (device + host + the demotion queue).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from typing import Any

from .durability import DiskLedger
from .options import StressOptions
from .runner import Workers, open_store

__all__ = ["Journal", "main"]


class Journal:
    """Append-only JSON lines, one ``write`` per line, flushed at once; safe from several threads."""

    def __init__(self, path: str) -> None:
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115  (kept open for the process's life)
        self._lock = threading.Lock()

    def write(self, doc: dict[str, Any]) -> None:
        """Append one line."""
        line = json.dumps(doc, separators=(",", ":")) + "\n"
        with self._lock:
            self._f.write(line)
            self._f.flush()

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._f.close()


def _metrics_doc(metrics: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tier in ("device", "host", "disk"):
        if tier in metrics:
            out[tier] = {k: metrics[tier][k] for k in ("hits", "misses", "evictions", "hit_rate", "corrupt_blocks")}
    out["offload"] = {k: v for k, v in metrics["offload"].items() if isinstance(v, int)}
    return out


def run_child(opts: StressOptions, life: int, journal: Journal, seconds: float) -> str:
    """Run one life of the workload; returns why it ended cleanly ("done" or "full")."""
    bm, faults = open_store(opts, opts.seed * 1000 + life)
    ledger = DiskLedger(bm, on_removed=lambda hs: journal.write({"event": "removed", "hashes": [h.hex() for h in hs]}))
    disk = bm.disk()
    assert disk is not None
    workers = Workers(bm, opts, life)
    limit = opts.epoch_limit()
    full = threading.Event()

    def watch_disk() -> None:
        while not workers.stop_event.is_set():
            if len(disk) >= limit:
                full.set()
                workers.stop_event.set()
                return
            time.sleep(0.005)

    def snapshot() -> None:
        journal.write({
            "event": "stats",
            "stats": workers.stats().to_dict(),
            "metrics": _metrics_doc(bm.metrics()),
            "faults_injected": sum(faults.injected.values()) if faults is not None else 0,
            "examples": workers.wrong_examples[:10],
        })

    def checkpoint() -> None:
        new = ledger.checkpoint()
        journal.write({"event": "durable", "hashes": [h.hex() for h in new]})
        if opts.plant_bug == "lose-blocks" and new:
            disk.storage.store.delete([new[0]])  # type: ignore[attr-defined]  # planted: forget a durable block

    workers.start()
    watcher = threading.Thread(target=watch_disk, name="stress-disk-watch", daemon=True)
    watcher.start()
    journal.write({"event": "ready", "pid": os.getpid()})
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not workers.stop_event.is_set():
        workers.stop_event.wait(min(opts.checkpoint_interval, max(0.0, deadline - time.monotonic())))
        checkpoint()
        snapshot()
    workers.stop()
    checkpoint()
    snapshot()
    bm.close()
    ledger.close()
    return "full" if full.is_set() else "done"


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``OPTIONS_JSON LIFE JOURNAL SECONDS``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 4:
        print("usage: python -m tiered_kv.stress.child OPTIONS_JSON LIFE JOURNAL SECONDS", file=sys.stderr)
        return 2
    # The journal reports what matters; the store's own warnings (checksum failures under --faults) go nowhere.
    logging.getLogger("tiered_kv").setLevel(logging.CRITICAL)
    with open(args[0], encoding="utf-8") as f:
        opts = StressOptions.from_dict(json.load(f))
    journal = Journal(args[2])
    reason = run_child(opts, int(args[1]), journal, float(args[3]))
    journal.write({"event": "exit", "reason": reason})
    journal.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
