"""Child processes for the vLLM integration tests (a second vLLM scheduler process on the same tier).

Usage:
    python vllm_child.py store PATH CHUNK_BYTES N STREAM [REMOTE_URL]
        Through vLLM's real TieringOffloadingManager, stores chunks key(STREAM, 0..N-1) (contents from
        vllm_helpers.content) into a TieredKvTier at PATH, shuts down cleanly, prints "done".
    python vllm_child.py storm PATH CHUNK_BYTES CAPACITY
        Stores chunks key("storm", i) for i = 0, 1, ... forever, 4 per job, through the tier's own API (the tier
        evicts to stay within CAPACITY). Prints "ready PID" once open, then "ok I J ..." for the chunks of each
        job that get_finished_jobs reported successful.
"""

from __future__ import annotations

import os
import sys

from vllm_helpers import (
    END_STEP,
    aligned_rows,
    content,
    job,
    key,
    offloading_config,
    spec_with_tier,
    store_through_manager,
    tier_entry,
)


def store(path: str, chunk: int, n: int, stream: str, remote_url: str | None) -> None:
    more = {"remote_url": remote_url} if remote_url else {}
    spec = spec_with_tier(chunk, path, 4 * n, primary_chunks=8, **more)
    manager = spec.get_manager()
    try:
        keys = [key(stream, i) for i in range(n)]
        for i in range(0, n, 8):
            store_through_manager(manager, keys[i : i + 8], req=f"child-{i}")
        manager.on_schedule_end(END_STEP)
    finally:
        manager.shutdown()
    print("done", flush=True)


def storm(path: str, chunk: int, capacity: int) -> None:
    from vllm.v1.kv_offload.tiering.spec import TieringOffloadingSpec

    from tiered_kv.integrations.vllm import TieredKvTier

    spec = TieringOffloadingSpec(offloading_config(chunk, tiers=[tier_entry(path, capacity)]))
    rows, view = aligned_rows(4, chunk)
    tier = TieredKvTier(spec, view, "TieredKvTier", path=path, num_blocks=capacity)
    print("ready", os.getpid(), flush=True)
    i = 0
    job_id = 0
    while True:
        keys = [key("storm", i + j) for j in range(4)]
        for j, k in enumerate(keys):
            rows[j] = content(k, chunk)
        tier.submit_store(job(job_id, keys, [0, 1, 2, 3], promotion=False))
        tier.drain_jobs()
        for result in tier.get_finished_jobs():
            if result.success:
                print("ok", *range(i, i + 4), flush=True)
        i += 4
        job_id += 1


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "store":
        store(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6] if len(sys.argv) > 6 else None)
    elif mode == "storm":
        storm(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
