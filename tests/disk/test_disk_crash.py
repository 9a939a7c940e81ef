"""Real crashes: SIGKILL a child process in the middle of a write storm, then check what survived.

Invariants after every kill:
* every block the child reported durable (and never announced for deletion) is present, with identical bytes;
* every row present either verifies and holds exactly its hash's bytes, or is reported corrupt by
  ``read_blocks``: wrong bytes are never returned as good.
"""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from disk_helpers import ALGO, MODEL, NAMESPACE, PYTHON, blocks_for, child_env, disk_config, same

from tiered_kv.storage.disk import DiskStore

CHILD = str(Path(__file__).with_name("disk_child.py"))
CAPACITY = 96


def _run_and_kill(
    path: Path, durability: str, seed: int, rng: random.Random, tmp: Path
) -> tuple[set[bytes], set[bytes]]:
    """One child life: returns (hashes reported durable, hashes announced for deletion)."""
    err_path = tmp / f"child-{seed}.err"
    with open(err_path, "wb") as err:
        child = subprocess.Popen(
            [PYTHON, CHILD, "storm", str(path), durability, str(CAPACITY), str(seed)],
            stdout=subprocess.PIPE,
            stderr=err,
            env=child_env(),
        )
    assert child.stdout is not None
    stdout = child.stdout
    chunks: list[bytes] = []
    ready = threading.Event()

    def drain() -> None:  # keep the pipe empty so the child never blocks on a print
        for line in stdout:
            if line == b"ready\n":
                ready.set()
            chunks.append(line)
        ready.set()

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        if not ready.wait(60) or not chunks or chunks[0] != b"ready\n":
            pytest.fail(f"storm child did not start: {err_path.read_text()[-2000:]}")
        time.sleep(rng.uniform(0.05, 0.6))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        reader.join()
    assert child.returncode == -signal.SIGKILL, err_path.read_text()[-2000:]
    durable: set[bytes] = set()
    deleted: set[bytes] = set()
    for line in chunks[1:]:
        if not line.endswith(b"\n"):
            continue  # a line cut by the kill
        kind, *hexes = line.decode().split()
        target = durable if kind == "w" else deleted
        target.update(bytes.fromhex(h) for h in hexes)
    return durable, deleted


def _check(path: Path, durable: set[bytes], deleted: set[bytes]) -> tuple[int, int]:
    with DiskStore(disk_config(path, CAPACITY, "sync"), MODEL, hash_algorithm=ALGO, namespace=NAMESPACE) as store:
        entries = store.entries()
        present = {e.hash for e in entries}
        missing = (durable - deleted) - present
        assert not missing, f"{len(missing)} durable blocks lost"
        out, bad = store.read_blocks([e.slot for e in entries])
        expected = blocks_for([e.hash for e in entries], MODEL)
        for i, e in enumerate(entries):
            if i in bad:
                assert e.hash not in durable or e.hash in deleted, "a durable block was reported corrupt"
            else:
                assert same(out[i], expected[i]), "wrong bytes returned as good"
        return len(entries), len(bad)


def _storm(tmp_path: Path, durability: str, kills: int, seed: int) -> None:
    rng = random.Random(seed)
    path = tmp_path / f"crash-{durability}"
    durable: set[bytes] = set()
    deleted: set[bytes] = set()
    total_durable = 0
    for life in range(kills):
        d, x = _run_and_kill(path, durability, seed * 1000 + life, rng, tmp_path)
        total_durable += len(d)
        durable |= d
        deleted |= x
        _check(path, durable, deleted)
    assert total_durable > 0, "the child never made anything durable: the test proved nothing"


@pytest.mark.parametrize("durability", ["sync", "batch"])
def test_kill9_write_storm(tmp_path: Path, durability: str) -> None:
    _storm(tmp_path, durability, kills=2, seed=11)


@pytest.mark.slow
@pytest.mark.parametrize("durability", ["sync", "batch", "none"])
def test_kill9_write_storm_long(tmp_path: Path, durability: str) -> None:
    _storm(tmp_path, durability, kills=15, seed=23)
