"""Child process for the disk crash tests: a write storm to be killed (the lock-holding writer of the backend
conformance suite is ``python -m tiered_kv.testing._disk_child``).

Usage:
    python disk_child.py storm PATH DURABILITY CAPACITY SEED
        Writes (and evicts) blocks forever. Prints "ready" once open, then per durable batch a line
        "w HEX HEX ..." (after write_blocks returned for durability=sync, after flush() for batch),
        and "d HEX ..." BEFORE deleting those hashes.
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


if __name__ == "__main__":
    if sys.argv[1:2] != ["storm"] or len(sys.argv) != 6:
        sys.exit("usage: python disk_child.py storm PATH DURABILITY CAPACITY SEED")
    storm(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
