"""A child process for :class:`~tiered_kv.testing.disk.BackendConformance`: a writer that holds the lock.

Usage:
    python -m tiered_kv.testing._disk_child hold PATH
        Opens PATH for writing, stores 8 blocks ("hold" stream), prints "ready PID", then stores 8 more
        ("hold2") and prints "more" when a line arrives on stdin, and exits at EOF.
"""

from __future__ import annotations

import os
import sys

from ..storage.disk import DiskStore
from ._data import blocks_for, seq_hash
from .disk import ALGO, MODEL, NAMESPACE, disk_config


def hold(path: str) -> None:
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
    if sys.argv[1:2] != ["hold"] or len(sys.argv) != 3:
        sys.exit("usage: python -m tiered_kv.testing._disk_child hold PATH")
    hold(sys.argv[2])
