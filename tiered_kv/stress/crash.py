"""Kill mode: the workload runs in a child process that is SIGKILLed about every ``kill_every`` seconds.

After each kill (or clean exit) the parent reads the child's journal, reopens the disk tier and checks it with
:func:`~tiered_kv.stress.durability.verify_disk`: every block the child journaled as durable (and not as removed)
must be there with identical bytes, and no block there may have wrong bytes. Then it starts the next life.

Epochs. The child never lets the disk tier evict (see :mod:`tiered_kv.stress.child`); when the tier reaches its
epoch limit the child exits with reason "full", the parent checks the tier as after a kill, then deletes it and
starts a new epoch with an empty tier.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

from ..manager import KvBlockManager
from .content import BlockContent
from .durability import verify_disk
from .options import StressOptions
from .report import sum_metrics
from .runner import Progress, RunResult
from .stats import Stats

__all__ = ["run_with_kills", "read_journal"]

#: Longest wait for a child to open the store and start its clients.
_START_TIMEOUT = 120.0


def read_journal(path: str) -> list[dict[str, Any]]:
    """The complete lines of a child's journal (a line cut by the kill is ignored)."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    break
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    break
    except FileNotFoundError:
        pass
    return out


def _last_stats(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    for ev in reversed(events):
        if ev.get("event") == "stats":
            return ev
    return None


def run_with_kills(opts: StressOptions, progress: Progress | None = None) -> RunResult:
    """Run ``opts.duration`` seconds of workload in child processes, killing them; check the tier after each."""
    assert opts.kill_every is not None
    rng = random.Random(f"{opts.seed}/kills")
    work = os.path.join(os.fspath(opts.path), "journal")
    os.makedirs(work, exist_ok=True)
    os.makedirs(opts.tier_path, exist_ok=True)
    opts_file = os.path.join(work, "options.json")
    with open(opts_file, "w", encoding="utf-8") as f:
        json.dump(opts.to_dict(), f)
    content = BlockContent(opts.model())
    required: set[bytes] = set()
    totals = Stats()
    metrics_parts: list[dict[str, Any]] = []
    examples: list[str] = []
    crashes = lives = faults_injected = detected = 0
    t0 = time.monotonic()
    deadline = t0 + opts.duration
    while time.monotonic() < deadline:
        lives += 1
        journal = os.path.join(work, f"life-{lives}.jsonl")
        log_path = os.path.join(work, f"life-{lives}.log")
        remaining = max(0.5, deadline - time.monotonic())
        with open(log_path, "wb") as log_file:
            child = subprocess.Popen(
                [sys.executable, "-m", "tiered_kv.stress.child", opts_file, str(lives), journal, f"{remaining:.3f}"],
                stdout=log_file, stderr=subprocess.STDOUT,
            )
        try:
            killed = _supervise(child, journal, opts, rng, remaining, t0, totals, crashes, progress)
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
        crashes += killed
        events = read_journal(journal)
        if not killed and child.returncode != 0:
            totals.add("client_failures")
            with open(log_path, encoding="utf-8", errors="replace") as f:
                tail = " | ".join(f.read().strip().splitlines()[-3:])
            examples.append(f"child life {lives} exited with {child.returncode}: {tail}")
        for ev in events:
            kind = ev.get("event")
            if kind == "durable":
                required.update(bytes.fromhex(h) for h in ev["hashes"])
            elif kind == "removed":
                required.difference_update(bytes.fromhex(h) for h in ev["hashes"])
        last = _last_stats(events)
        if last is not None:
            totals.merge(Stats.from_dict(last["stats"]))
            metrics_parts.append(last["metrics"])
            faults_injected += int(last["faults_injected"])
            examples.extend(last.get("examples", []))
        # Reopen the tier and check it: durable blocks all there, every block's bytes right.
        with KvBlockManager(opts.config(disk_only=True)) as check_bm:
            check = verify_disk(check_bm, content, required)
        totals.add("blocks_verified", check.verified)
        totals.add("verified_disk", check.verified)
        totals.add("wrong", check.wrong)
        totals.add("unreachable", check.unreachable)
        totals.add("not_prefix_closed", check.not_prefix_closed)  # --kill-every: prefix-closed after each restart
        if opts.faults > 0:
            totals.add("lost", check.lost)
            detected += check.corrupt
        else:
            totals.add("lost", check.lost + check.corrupt_required)
        examples.extend(f"after life {lives}: {e}" for e in check.examples)
        present = _present(opts)
        required &= present  # a loss is counted once; corrupt blocks were dropped by the check
        if any(ev.get("event") == "exit" and ev.get("reason") == "full" for ev in events):
            shutil.rmtree(opts.tier_path)
            os.makedirs(opts.tier_path)
            required.clear()
    return RunResult(
        stats=totals,
        metrics=sum_metrics(metrics_parts),
        elapsed=time.monotonic() - t0,
        crashes=crashes,
        faults_injected=faults_injected,
        detected_extra=detected,
        disk_evictions=sum(int(m.get("disk", {}).get("evictions", 0)) for m in metrics_parts),
        lives=lives,
        examples=examples,
    )


def _present(opts: StressOptions) -> set[bytes]:
    with KvBlockManager(opts.config(disk_only=True)) as bm:
        disk = bm.disk()
        assert disk is not None
        return set(disk.cached_hashes())


def _supervise(
    child: subprocess.Popen[bytes],
    journal: str,
    opts: StressOptions,
    rng: random.Random,
    seconds: float,
    t0: float,
    totals: Stats,
    crashes: int,
    progress: Progress | None,
) -> int:
    """Wait for the child to start, then SIGKILL it at a random time around ``kill_every``; 1 if it was killed.

    The child works ``seconds`` from its start (startup time is not workload time); a kill due after that is
    not made, and the child ends cleanly instead.
    """
    assert opts.kill_every is not None
    start_by = time.monotonic() + _START_TIMEOUT
    while not any(ev.get("event") == "ready" for ev in read_journal(journal)):
        if child.poll() is not None or time.monotonic() > start_by:
            return 0
        time.sleep(0.05)
    ready = time.monotonic()
    end = ready + seconds
    kill_at = ready + rng.uniform(0.5, 1.5) * opts.kill_every
    while child.poll() is None:
        now = time.monotonic()
        if kill_at <= now < end - 0.1:
            os.kill(child.pid, signal.SIGKILL)
            return 1
        if now > end + 60.0:  # the child should have ended on its own by now
            child.kill()
            return 1
        if progress is not None:
            last = _last_stats(read_journal(journal))
            if last is not None:
                merged = Stats.merged([totals, Stats.from_dict(last["stats"])])
                progress(now - t0, merged, last["metrics"], crashes)
        time.sleep(0.1)
    return 0
