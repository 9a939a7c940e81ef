"""Fault injection through FaultInjectingBackend: errors translated, nothing torn is ever returned as good."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from disk_helpers import ALGO, MODEL, NAMESPACE, blocks_for, disk_config, same, seq_hash

from tiered_kv.errors import DiskFullError, DiskTierError
from tiered_kv.storage.disk import DiskStore, FaultInjectingBackend, PosixBackend


@pytest.fixture
def faulty(tmp_path: Path) -> Iterator[tuple[DiskStore, FaultInjectingBackend]]:
    backend = FaultInjectingBackend(PosixBackend(), rate=0.0, seed=7)
    store = DiskStore(
        disk_config(tmp_path / "t", 64, "sync"), MODEL, hash_algorithm=ALGO, namespace=NAMESPACE, backend=backend
    )
    yield store, backend
    store.close()


def _fill(store: DiskStore, tag: str, slots: list[int]) -> list[bytes]:
    hashes = [seq_hash(tag, s) for s in slots]
    store.write_blocks(hashes, slots, blocks_for(hashes, MODEL))
    return hashes


def test_enospc_is_disk_full_and_leaves_no_row(faulty: tuple[DiskStore, FaultInjectingBackend]) -> None:
    store, backend = faulty
    good = _fill(store, "good", [0, 1, 2])
    backend.rate, backend.kinds = 1.0, ("enospc",)
    hashes = [seq_hash("full", i) for i in range(4)]
    with pytest.raises(DiskFullError, match="errno 28"):
        store.write_blocks(hashes, [10, 11, 12, 13], blocks_for(hashes, MODEL))
    assert backend.injected["enospc"] == 4
    assert all(store.lookup(h) is None for h in hashes)
    backend.rate = 0.0
    # Stored blocks stay readable, the failed slots are free, the store keeps serving.
    out, bad = store.read_blocks([0, 1, 2])
    assert bad == [] and same(out, blocks_for(good, MODEL))
    store.write_blocks(hashes, [10, 11, 12, 13], blocks_for(hashes, MODEL))
    assert store.read_blocks([10, 11, 12, 13])[1] == []


def test_partial_eio_commits_nothing(faulty: tuple[DiskStore, FaultInjectingBackend]) -> None:
    store, backend = faulty
    backend.rate, backend.kinds = 0.3, ("eio",)
    hashes = [seq_hash("eio", i) for i in range(32)]
    with pytest.raises(DiskTierError, match="errno 5") as info:
        store.write_blocks(hashes, list(range(32)), blocks_for(hashes, MODEL))
    assert not isinstance(info.value, DiskFullError)
    assert isinstance(info.value.__cause__, OSError)
    assert store.entries() == []  # one batch, one transaction: all or nothing


def test_read_eio_is_a_failed_block_not_an_exception(faulty: tuple[DiskStore, FaultInjectingBackend]) -> None:
    store, backend = faulty
    hashes = _fill(store, "r", list(range(8)))
    backend.rate, backend.kinds = 1.0, ("eio",)
    _, bad = store.read_blocks([0, 1])
    assert bad == [0, 1]
    assert store.corrupt_count == 2 and store.lookup(hashes[0]) is None
    backend.rate = 0.0
    out, bad = store.read_blocks(list(range(2, 8)))
    assert bad == [] and same(out, blocks_for(hashes[2:], MODEL))


@pytest.mark.parametrize("kind", ["torn", "bitflip"])
def test_silent_write_corruption_detected(faulty: tuple[DiskStore, FaultInjectingBackend], kind: str) -> None:
    store, backend = faulty
    old = _fill(store, "old", list(range(16)))
    store.delete(old)  # the slots hold old bytes: a torn write of new data must not pass as either
    backend.rate, backend.kinds = 0.5, (kind,)
    hashes = [seq_hash(kind, i) for i in range(16)]
    store.write_blocks(hashes, list(range(16)), blocks_for(hashes, MODEL))  # reports success
    hit = backend.injected[kind]
    assert hit > 0
    backend.rate = 0.0
    expected = blocks_for(hashes, MODEL)
    out, bad = store.read_blocks(list(range(16)))
    assert len(bad) == hit
    for i in range(16):
        if i not in bad:
            assert same(out[i], expected[i])  # every block returned as good IS good
    assert store.corrupt_count == hit
    assert len(store.entries()) == 16 - hit
    # The freed slots are reusable.
    again = [hashes[i] for i in bad]
    store.write_blocks(again, bad, blocks_for(again, MODEL))
    assert store.read_blocks(bad)[1] == []


def test_read_bitflip_detected(faulty: tuple[DiskStore, FaultInjectingBackend]) -> None:
    store, backend = faulty
    hashes = _fill(store, "rb", list(range(8)))
    backend.rate, backend.kinds = 1.0, ("bitflip",)
    _, bad = store.read_blocks([3, 4])
    assert bad == [0, 1] and backend.injected["bitflip"] == 2
    backend.rate = 0.0
    assert store.read_blocks([0, 1, 2])[1] == []
    assert {e.hash for e in store.entries()} == set(hashes) - {hashes[3], hashes[4]}


def test_mixed_faults_concurrently_never_return_bad_bytes(tmp_path: Path) -> None:
    """Several threads write and read through 20% faults; whatever is returned as good is right."""
    backend = FaultInjectingBackend(PosixBackend(), rate=0.2, seed=3)
    store = DiskStore(
        disk_config(tmp_path / "t", 256, "batch"), MODEL, hash_algorithm=ALGO, namespace=NAMESPACE, backend=backend
    )
    wrong: list[bytes] = []
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            my_slots = list(range(t * 64, t * 64 + 64))
            for round_ in range(6):
                hashes = [seq_hash(f"mt{t}-{round_}", s) for s in my_slots]
                for start in range(0, 64, 16):
                    with contextlib.suppress(DiskTierError):  # a failed batch leaves no row
                        store.write_blocks(
                            hashes[start : start + 16],
                            my_slots[start : start + 16],
                            blocks_for(hashes[start : start + 16], MODEL),
                        )
                present = [(s, h) for s, h in zip(my_slots, hashes, strict=True) if store.lookup(h) is not None]
                if present:
                    out, bad = store.read_blocks([s for s, _ in present])
                    expected = blocks_for([h for _, h in present], MODEL)
                    wrong.extend(
                        present[i][1] for i in range(len(present)) if i not in bad and not same(out[i], expected[i])
                    )
                store.delete(hashes)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    store.close()
    assert errors == []
    assert wrong == []
    assert sum(backend.injected.values()) > 0


def test_fault_wrapper_validates() -> None:
    with pytest.raises(ValueError):
        FaultInjectingBackend(PosixBackend(), rate=2.0)
    with pytest.raises(ValueError):
        FaultInjectingBackend(PosixBackend(), rate=0.1, kinds=("meteor",))


class _DeleteDuringRead(FaultInjectingBackend):
    """Fails every read (EIO) and, while the read is in flight, lets another caller delete those blocks."""

    def __init__(self, inner: PosixBackend) -> None:
        super().__init__(inner, rate=0.0, seed=3)
        self.during_read: list[bytes] = []
        self.store: DiskStore | None = None

    def pread_blocks(self, ops):  # type: ignore[no-untyped-def]
        if self.during_read and self.store is not None:
            self.store.delete(self.during_read)  # an eviction or a second reader dropping the same rows
        return [OSError(5, "injected EIO") for _ in ops]


def test_failed_read_of_a_block_deleted_meanwhile(tmp_path: Path) -> None:
    # Regression: the stress run's reader thread died with KeyError when a block that failed its read was deleted
    # by another thread between the read and the drop of the failed rows.
    backend = _DeleteDuringRead(PosixBackend())
    store = DiskStore(
        disk_config(tmp_path / "t", 16, "sync"), MODEL, hash_algorithm=ALGO, namespace=NAMESPACE, backend=backend
    )
    try:
        backend.store = store
        hashes = _fill(store, "gone", [0, 1, 2])
        backend.during_read = hashes[:2]
        _, bad = store.read_blocks([0, 1, 2])
        assert bad == [0, 1, 2]
        assert store.corrupt_count == 1  # only the block still there when the failure was dropped counts
        assert all(store.lookup(h) is None for h in hashes)
        store.flush()
    finally:
        store.close()
    reopened = DiskStore(disk_config(tmp_path / "t", 16, "sync"), MODEL, hash_algorithm=ALGO, namespace=NAMESPACE)
    try:
        assert reopened.entries() == []  # every deletion committed
    finally:
        reopened.close()
