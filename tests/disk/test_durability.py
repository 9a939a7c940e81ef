"""Group-committed deletions and the power-loss flags of the disk store (store rules 2 and 3).

``delete()`` is called by the disk pool while it holds its lock, once per eviction; it must not pay a registry
commit (an fdatasync with ``batch``'s flags). It queues the deletion, and the store writes a freed slot only
after that deletion has committed. These tests record the real registry transactions and the real writes of a
real store (pass-through wrappers, nothing stubbed) to check that ordering.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from disk_helpers import ALGO, MODEL, NAMESPACE, blocks_for, disk_config, same, seq_hash

from tiered_kv.storage.disk import DiskStore
from tiered_kv.storage.disk._posix import PosixBackend
from tiered_kv.storage.disk.backend import IoOp

Event = tuple[str, Any]


class _RecordingBackend(PosixBackend):
    """The posix backend, logging the slots of every write into a shared event list."""

    def __init__(self, events: list[Event], lock: threading.Lock) -> None:
        super().__init__()
        self.events = events
        self.lock = lock
        self.stride = 0
        self.nshards = 1

    def pwrite_blocks(self, ops: Sequence[IoOp]) -> None:
        with self.lock:
            self.events.append(("write", {op.offset // self.stride * self.nshards + op.file_index for op in ops}))
        super().pwrite_blocks(ops)


@pytest.fixture
def recorded(tmp_path: Path) -> Iterator[tuple[DiskStore, list[Event]]]:
    events: list[Event] = []
    lock = threading.Lock()
    backend = _RecordingBackend(events, lock)
    store = DiskStore(
        disk_config(tmp_path / "t", 16, "batch"), MODEL, hash_algorithm=ALGO, namespace=NAMESPACE, backend=backend
    )
    backend.stride, backend.nshards = store.stride, store.nshards
    assert store._registry is not None
    registry = store._registry
    commit = registry.commit

    def recording_commit(puts: Any = (), deletes: Any = (), meta: Any = None) -> None:
        deletes = list(deletes)
        commit(puts=puts, deletes=deletes, meta=meta)
        with lock:
            events.append(("commit", (threading.get_ident(), set(deletes))))

    registry.commit = recording_commit  # type: ignore[method-assign]
    try:
        yield store, events
    finally:
        store.close()


def test_delete_hides_the_rows_without_committing_in_the_callers_thread(
    recorded: tuple[DiskStore, list[Event]],
) -> None:
    store, events = recorded
    a = [seq_hash("a", i) for i in range(4)]
    store.write_blocks(a, [0, 1, 2, 3], blocks_for(a, MODEL))
    before = len(events)
    store.delete(a[2:])
    mine = [e for e in events[before:] if e[0] == "commit" and e[1][0] == threading.get_ident()]
    assert mine == []  # the caller (the disk pool, under its lock) paid no transaction
    assert store.lookup(a[2]) is None and store.lookup(a[3]) is None and len(store) == 2
    with pytest.raises(Exception, match="holds no block"):
        store.read_blocks([2])
    store.flush()  # commits the queue
    assert store._registry is not None
    assert store._registry.get(a[2]) is None and store._registry.get(a[3]) is None
    assert store._registry.get(a[0]) is not None


def test_a_freed_slot_is_written_only_after_its_deletion_commits(recorded: tuple[DiskStore, list[Event]]) -> None:
    store, events = recorded
    a = [seq_hash("a", i) for i in range(4)]
    store.write_blocks(a, [0, 1, 2, 3], blocks_for(a, MODEL))
    store.delete([a[1]])
    b = [seq_hash("b", 0)]
    before = len(events)
    store.write_blocks(b, [1], blocks_for(b, MODEL))  # the slot handed out again at once
    deleted_at = next(i for i, e in enumerate(events) if e[0] == "commit" and a[1] in e[1][1])
    written_at = next(i for i, e in enumerate(events) if i >= before and e[0] == "write" and 1 in e[1])
    assert deleted_at < written_at  # rule 2: no committed row pointed at slot 1 when it was overwritten
    out, bad = store.read_blocks([0, 1])
    assert bad == [] and same(out, blocks_for([a[0], b[0]], MODEL))


def test_delete_then_store_again(tmp_path: Path) -> None:
    path = tmp_path / "t"
    a = [seq_hash("a", i) for i in range(3)]
    with DiskStore(disk_config(path, 8), MODEL, hash_algorithm=ALGO, namespace=NAMESPACE) as store:
        store.write_blocks(a, [0, 1, 2], blocks_for(a, MODEL))
        store.delete(a[:2])
        store.write_blocks(a[:1], [5], blocks_for(a[:1], MODEL))  # another slot
        store.delete([a[2]])
        store.write_blocks([a[2]], [2], blocks_for([a[2]], MODEL))  # its own freed slot
    with DiskStore(disk_config(path, 8), MODEL, hash_algorithm=ALGO, namespace=NAMESPACE) as store:
        assert sorted((e.slot, e.hash) for e in store.entries()) == [(2, a[2]), (5, a[0])]
        out, bad = store.read_blocks([2, 5])
        assert bad == [] and same(out, blocks_for([a[2], a[0]], MODEL))


def test_compact_never_copies_into_a_slot_whose_deletion_is_queued(tmp_path: Path) -> None:
    a = [seq_hash("a", i) for i in range(6)]
    path = tmp_path / "t"
    with DiskStore(disk_config(path, 8), MODEL, hash_algorithm=ALGO, namespace=NAMESPACE) as store:
        store.write_blocks(a, list(range(6)), blocks_for(a, MODEL))
        store.delete(a[:3])
        moves = store.compact()
        assert {h: new for h, (_, new) in moves.items()} == {a[3]: 0, a[4]: 1, a[5]: 2}
        assert store._registry is not None and store._registry.get(a[0]) is None
    with DiskStore(disk_config(path, 8), MODEL, hash_algorithm=ALGO, namespace=NAMESPACE) as store:
        entries = store.entries()
        assert sorted(e.hash for e in entries) == sorted(a[3:])
        out, bad = store.read_blocks([e.slot for e in entries])
        assert bad == [] and same(out, blocks_for([e.hash for e in entries], MODEL))


def test_batch_rows_are_committed_when_write_blocks_returns(recorded: tuple[DiskStore, list[Event]]) -> None:
    store, events = recorded
    a = [seq_hash("a", i) for i in range(3)]
    store.write_blocks(a, [0, 1, 2], blocks_for(a, MODEL))
    # Acknowledged only once a transaction carrying the batch committed (the committer's): a kill -9 keeps it.
    assert store._registry is not None and all(store._registry.get(h) is not None for h in a)
    assert any(e[0] == "commit" for e in events)


def test_sync_rows_are_committed_before_write_blocks_returns(tmp_path: Path) -> None:
    a = [seq_hash("a", i) for i in range(2)]
    with DiskStore(disk_config(tmp_path / "t", 8, "sync"), MODEL, hash_algorithm=ALGO, namespace=NAMESPACE) as s:
        s.write_blocks(a, [0, 1], blocks_for(a, MODEL))
        assert s._registry is not None and all(s._registry.get(h) is not None for h in a)
