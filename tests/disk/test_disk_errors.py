"""The disk tier's error boundary: a held writer lock is a TierLockedError naming the holder; OS and LMDB errors
arrive as the most specific public error, chained to their cause."""

from __future__ import annotations

import errno
import fcntl
import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest
from disk_helpers import ALGO, MODEL, NAMESPACE, blocks_for, disk_config, seq_hash

from tiered_kv import DiskFullError, DiskTierError, TierLockedError
from tiered_kv.storage.disk import DiskStore
from tiered_kv.storage.disk._errors import disk_error
from tiered_kv.storage.disk.registry import Registry


def _open(path: Path, *, readonly: bool = False) -> DiskStore:
    return DiskStore(disk_config(path, 16), MODEL, hash_algorithm=ALGO, namespace=NAMESPACE, readonly=readonly)


def _make(path: Path) -> list[bytes]:
    hashes = [seq_hash("lock", i) for i in range(3)]
    with _open(path) as s:
        s.write_blocks(hashes, [0, 1, 2], blocks_for(hashes, MODEL))
    return hashes


@pytest.fixture
def held(tmp_path: Path) -> Iterator[Path]:
    """A closed tier whose writer lock is held through another open file description, as another process would."""
    path = tmp_path / "tier"
    _make(path)
    fd = os.open(path / "writer.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.pwrite(fd, b"pid=4242 host=elsewhere\n", 0)
        yield path
    finally:
        os.close(fd)  # drops the flock


def test_a_held_writer_lock_is_tier_locked_error_naming_the_holder(held: Path) -> None:
    with pytest.raises(TierLockedError) as info:
        _open(held)
    exc = info.value
    assert isinstance(exc, DiskTierError)  # ``except DiskTierError`` callers keep working
    assert exc.holder == "pid=4242 host=elsewhere" and exc.path == str(held)
    assert "already open for writing by pid=4242 host=elsewhere" in str(exc)
    assert isinstance(exc.__cause__, OSError) and exc.__cause__.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is TierLockedError and str(again) == str(exc) and again.holder == exc.holder
    # Readers need no lock, and the refused writer left the holder's lock file as it was.
    with _open(held, readonly=True) as ro:
        assert len(ro) == 3
    assert (held / "writer.lock").read_text().strip() == "pid=4242 host=elsewhere"


def test_the_lock_is_free_again_once_the_holder_lets_go(tmp_path: Path) -> None:
    path = tmp_path / "tier"
    _make(path)
    fd = os.open(path / "writer.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with pytest.raises(TierLockedError, match="an unknown process"):  # the holder wrote nothing into the file
        _open(path)
    os.close(fd)
    with _open(path) as s:
        assert len(s) == 3
        assert (path / "writer.lock").read_text().startswith(f"pid={os.getpid()} ")


def test_a_second_writer_in_this_process_is_tier_locked_error(tmp_path: Path) -> None:
    path = tmp_path / "tier"
    with _open(path):
        with pytest.raises(TierLockedError, match=f"this process \\(pid={os.getpid()}, writer\\).*one handle"):
            _open(path)
        # A reader in the same process is refused too, but not for the lock: LMDB's one handle per process.
        with pytest.raises(DiskTierError, match="one handle per process") as info:
            _open(path, readonly=True)
        assert not isinstance(info.value, TierLockedError)


def test_a_full_registry_map_is_disk_full_error(tmp_path: Path) -> None:
    reg = Registry(tmp_path, readonly=False, map_size=64 << 10, sync=False)  # room for a few hundred rows
    try:
        with pytest.raises(DiskFullError, match="registry is full") as info:
            reg.commit(puts={seq_hash("full", i): [i, i, 64, 0.0, 0.0, 0] for i in range(20_000)})
        assert isinstance(info.value.__cause__, lmdb.MapFullError)
        assert reg.get(seq_hash("full", 0)) is None  # nothing of the failed transaction was committed
    finally:
        reg.close()


def test_os_errors_map_to_the_most_specific_public_error(tmp_path: Path) -> None:
    full = disk_error(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "data-000.bin")), "writing")
    assert type(full) is DiskFullError and "errno 28" in str(full) and "data-000.bin" in str(full)
    quota = disk_error(OSError(errno.EDQUOT, "Disk quota exceeded"), "writing")
    assert type(quota) is DiskFullError
    eio = disk_error(OSError(errno.EIO, "Input/output error"), "reading block 7")
    assert type(eio) is DiskTierError and str(eio) == "reading block 7: [errno 5] Input/output error"
    already = DiskTierError("public already")
    assert disk_error(already, "anything") is already


def test_a_missing_data_file_is_a_disk_tier_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "tier"
    _make(path)
    (path / "data-003.bin").unlink()
    with pytest.raises(DiskTierError, match=r"data-003\.bin") as info:
        _open(path, readonly=True)
    assert isinstance(info.value.__cause__, FileNotFoundError)
