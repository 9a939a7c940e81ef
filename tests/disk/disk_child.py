"""Child processes for the disk tests: a write storm to be killed, and a writer that holds the lock.

Usage:
    python disk_child.py storm PATH DURABILITY CAPACITY SEED
        Writes (and evicts) blocks forever. Prints "ready" once open, then per durable batch a line
        "w HEX HEX ..." (after write_blocks returned for durability=sync, after flush() for batch),
        and "d HEX ..." BEFORE deleting those hashes.
    python disk_child.py hold PATH
        Opens PATH for writing, stores 8 blocks ("hold" stream), prints "ready PID", then stores 8 more
        ("hold2") and prints "more" when a line arrives on stdin, and exits at EOF.
"""

from __future__ import annotations

import collections
import random
import sys

from disk_helpers import ALGO, MODEL, NAMESPACE, blocks_for, disk_config, seq_hash

from tiered_kv.storage.disk import DiskStore


def storm(path: str, durability: str, capacity: int, seed: int) -> None:
    store = DiskStore(disk_config(path, capacity, durability), MODEL, hash_algorithm=ALGO, namespace=NAMESPACE)
    entries = store.entries()
    used = {e.slot for e in entries}
    free = [s for s in range(capacity) if s not in used]
    live = collections.deque(e.hash for e in entries)
    rng = random.Random(seed)
    pending: list[bytes] = []
    print("ready", flush=True)
    i = 0
    while True:
        n = rng.randint(1, 8)
        if len(free) < n:
            victims = [live.popleft() for _ in range(n - len(free) + rng.randint(0, 4)) if live]
            print("d", *(h.hex() for h in victims), flush=True)  # intent first: the delete may commit unseen
            slots = [e.slot for e in (store.lookup(h) for h in victims) if e is not None]
            store.delete(victims)
            free.extend(slots)
        hashes = [seq_hash(f"storm{seed}", i + k) for k in range(n)]
        i += n
        slots = [free.pop(rng.randrange(len(free))) for _ in range(n)]
        store.write_blocks(hashes, slots, blocks_for(hashes, MODEL))
        live.extend(hashes)
        if durability == "sync":
            print("w", *(h.hex() for h in hashes), flush=True)
        else:
            pending.extend(hashes)
            if rng.random() < 0.2:
                store.flush()
                print("w", *(h.hex() for h in pending), flush=True)
                pending.clear()


def hold(path: str) -> None:
    import os

    store = DiskStore(disk_config(path, 64, "sync"), MODEL, hash_algorithm=ALGO, namespace=NAMESPACE)
    hashes = [seq_hash("hold", k) for k in range(8)]
    store.write_blocks(hashes, list(range(8)), blocks_for(hashes, MODEL))
    print("ready", os.getpid(), flush=True)
    for _line in sys.stdin:
        more = [seq_hash("hold2", k) for k in range(8)]
        store.write_blocks(more, list(range(8, 16)), blocks_for(more, MODEL))
        print("more", flush=True)
    store.close()


if __name__ == "__main__":
    if sys.argv[1] == "storm":
        storm(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        hold(sys.argv[2])
