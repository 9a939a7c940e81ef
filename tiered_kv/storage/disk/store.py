"""DiskStore: block bytes in preallocated files, an LMDB registry, crash safety. No eviction policy.

The block pool above owns slot allocation and eviction decisions; this module owns the bytes on disk,
the registry and the ordering that makes a ``kill -9`` (or a power cut, see *durability*) safe.

On-disk layout of a tier directory ``PATH``::

    PATH/
      writer.lock           flock(LOCK_EX) of the one writer process; holds "pid=N host=H"
      data-000.bin ...      NSHARDS preallocated (posix_fallocate) data files
      data-007.bin
      registry/             LMDB environment: "blocks" (hash -> row) and "meta" databases

Slots: ``stride = round_up(block_size_bytes, 4096)``. Slot ``i`` lives in shard ``i % NSHARDS`` at byte
offset ``(i // NSHARDS) * stride``. Shard ``k`` of a tier of capacity ``C`` holds
``ceil((C - k) / NSHARDS)`` slots and is exactly that many strides long. Sharding spreads a batch over
several inodes, so first writes into unwritten (fallocated) extents, which take the inode lock for the
extent conversion, still run in parallel. The shard count is fixed when the tier is created and stored
in the meta record.

Crash ordering (the rules every method below follows; comments at each site say which one):

1. Write: data bytes are written to free slots first, then all the batch's rows are committed in ONE LMDB
   write transaction. With ``durability="sync"`` the data is fdatasync'ed before the commit and the commit itself
   is synced, in the caller's thread, so a row on disk always points at durable data when ``write_blocks``
   returns. With "batch" and "none" the rows are group-committed: ``commit_written`` puts them in the in-memory
   maps and queues them, and returns once a transaction carrying them has committed: the committer thread's
   next pass, which carries every batch queued meanwhile (by other writers) and every queued deletion, so
   concurrent writers share one transaction (one registry fdatasync under rule 3). The data was written before
   its rows were queued, so before they commit, and a batch is acknowledged only once committed, so a
   ``kill -9`` loses no acknowledged batch. A queue is committed whole, so the registry only passes through
   states the in-memory maps had (no batch is split, and a parent registered before its child never commits
   after it).
2. Delete: ``delete()`` drops the rows from the in-memory maps at once (lookups and reads no longer see them)
   and queues their deletion, which commits with the next transaction (rule 1's committer, a synchronous
   commit, a flush or a close; deletions first, then puts: a hash deleted and stored again ends up stored). The
   caller may hand the slots out again as soon as ``delete()`` returns, but the store never writes a slot while
   a committed row points at it: ``write_data`` (and ``compact``) first commit the queued deletions of the slots
   they are about to overwrite. So a slot's old bytes stay intact until its row's deletion has committed, and a
   crash before that commit brings the row back pointing at its own, intact bytes. Such a resurrected block is
   a valid cache entry, and the tier stays prefix-closed: the queue commits whole, and eviction removes a
   block's descendants before or together with it, so a resurrected block's parent is on disk or resurrected
   too. Why queued: the disk pool deletes its victims while it holds its own lock, one call per eviction; a
   commit there (an fdatasync with rule 3's flags) stalled every allocation behind it.
3. ``durability="batch"``: each commit fdatasyncs LMDB's data pages but not its meta page (``sync=True,
   metasync=False``: ``MDB_NOMETASYNC``), which LMDB documents keeps the environment's integrity (atomicity,
   consistency, isolation) through a system crash and may undo only the last committed transaction; the
   block data files are not synced per commit. A background thread, at least every second, fdatasyncs the
   data files THEN ``env.sync(True)``, so the rows it makes durable point at synced data. But a batch may
   commit between the two syncs (and its registry pages are synced by the commit itself), so after a power
   cut a durable row can point at a slot whose new bytes never reached the disk. The xxh3-64 checksum in the
   row catches exactly that: reads verify every block and drop rows that fail, so torn or stale bytes are
   never served as good (such a block's descendants become orphans: :meth:`DiskStore.check` finds them). A
   process crash (``kill -9``) loses nothing committed: the page cache survives it. The registry fdatasync
   costs one per transaction, so rules 1 and 2 keep transactions few: one per committer pass (however many
   batches and evictions it carries) plus one before a freed slot is overwritten. ``tools/bench_durability.py``
   measures it against the old ``MDB_NOSYNC`` flags, which ``_BATCH_SYNCS_COMMITS = False`` restores.
4. ``durability="none"``: ``MDB_NOSYNC`` and no background data sync (a power cut may corrupt the registry:
   for caches that can be thrown away); ``flush()``/``close()`` sync.
5. Two rows claiming one slot (possible only after a power cut in batch/none mode undid a delete but
   kept a later write): the newer row wins at open, the other is dropped.
6. Capacity changes at open: growing fallocates the files before the meta record says so; shrinking
   drops the least recently used excess rows (commit), copies survivors from high slots to free low
   slots (data synced), commits their new slots together with the new capacity in one transaction,
   and only then truncates the files. A crash at any point leaves rows pointing at intact data.
7. Format migration at open (writers only): a version 1 tier gets the parent field in every row (None: unknown)
   and its new version in the meta record in ONE transaction; a crash leaves the old tier or the new one.
   Read-only openers never migrate: they read version 1 rows as they are.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from operator import itemgetter
from typing import Any, cast

import numpy as np
import torch
import xxhash

from ...config import HASH_ALGORITHMS, DiskConfig, ModelConfig
from ...errors import ConfigError, CorruptBlockError, DiskTierError, LayoutMismatchError, TierLockedError
from ...hashing import check_hash
from ._errors import disk_error, locked, translated
from ._kvikio import KvikioBackend, kvikio_unavailable_reason
from ._posix import PosixBackend, aligned_empty
from .backend import SLOT_ALIGNMENT, DiskBackend, IoOp, buffer_array, round_up
from .registry import (
    FORMAT_VERSION,
    READABLE_FORMAT_VERSIONS,
    REGISTRY_DIR,
    ROW_FIELDS,
    Registry,
    Row,
    check_format_version,
    gc_paused,
    is_row,
    pad_row,
    read_tier_meta,
)

__all__ = [
    "FORMAT_VERSION",
    "READABLE_FORMAT_VERSIONS",
    "DiskStore",
    "Entry",
    "VerifyReport",
    "find_orphans",
    "read_tier_meta",
]

logger = logging.getLogger("tiered_kv.disk")

# FORMAT_VERSION and READABLE_FORMAT_VERSIONS live with the registry (the module that owns the on-disk format) and
# are re-exported here.
_LAYOUT_KIND = "sharded"
_NSHARDS = 8
_FILE_PATTERN = "data-{:03d}.bin"
_LOCK_FILE = "writer.lock"
_SYNC_INTERVAL_S = 0.5  # < 1 s: the "batch" durability promise is "synced at least every second"
# Rule 1: the committer's passes are at least this far apart while no writer waits for one (queued deletions and
# touches gather; a writer waiting for its batch or for a freed slot cuts the pause short).
_COMMIT_INTERVAL_S = 0.005
# A writer waits this long for the committer before committing itself (the committer is failing or stuck).
_AWAIT_COMMIT_S = 5.0
_MIN_MAP_SIZE = 1 << 30
_MAP_BYTES_PER_BLOCK = 2048  # a row is ~100 B in LMDB; 20x headroom for copy-on-write and free pages
_IO_BATCH_BYTES = 256 << 20  # verify/shrink read this much per batch
# Rule 3: "batch" commits sync LMDB's data pages (MDB_NOMETASYNC: integrity through power loss, only the last
# transaction may be undone). False restores MDB_NOSYNC (the old flags; tools/bench_durability.py compares them).
_BATCH_SYNCS_COMMITS = True


@dataclass(frozen=True)
class Entry:
    """One live block of the disk tier, as recorded in its registry row."""

    hash: bytes
    slot: int
    checksum: int
    size: int
    created: float
    last_access: float
    hits: int
    tokens: bytes | None = None  # the block's token ids (uint32 LE) when the writer recorded them
    parent: bytes | None = None  # the previous block's hash; None for a chain head (and rows of format version 1)


def _entry(key: bytes, row: Row) -> Entry:
    return Entry(key, *row)


def _padded(rows: dict[bytes, Row]) -> dict[bytes, Row]:
    """Complete format-version-1 rows in place (a C-level length check first: a version 2 tier costs one pass).

    Rows in memory always have every field. Malformed values are left as they are: the writer's open drops them
    (:meth:`DiskStore._reconcile`).
    """
    try:
        full = set(map(len, rows.values())) <= {len(ROW_FIELDS)}
    except TypeError:  # a malformed row (not an array)
        full = False
    if not full:
        for key, row in rows.items():
            if is_row(row):
                rows[key] = pad_row(row)
    return rows


@dataclass(frozen=True)
class VerifyReport:
    """What :meth:`DiskStore.check` found, each in slot order (and, with ``repair``, dropped)."""

    checked: int  # blocks read and checked against their checksums
    corrupt: tuple[bytes, ...]  # failed their checksum, or could not be read
    out_of_range: tuple[bytes, ...]  # rows whose slot lies outside the capacity (not read)
    orphans: tuple[bytes, ...]  # ancestor chain broken on disk (the blocks above counted as gone)
    repaired: bool  # everything above was dropped, in one transaction

    @property
    def clean(self) -> bool:
        """Nothing was found."""
        return not (self.corrupt or self.out_of_range or self.orphans)


def find_orphans(parents: Mapping[bytes, bytes | None], absent: Iterable[bytes] = ()) -> set[bytes]:
    """The orphans among stored blocks: those whose parent is not stored, or is an orphan itself.

    Args:
        parents: every stored block's hash -> its parent's hash (None: a chain head).
        absent: hashes to count as not stored even if they are in ``parents`` (blocks about to be dropped);
            they are not reported themselves.

    Returns:
        The orphans' hashes. A parent cycle (only damaged rows could make one) reaches no chain head, so its
        blocks are orphans too. O(n): each block's walk up its chain stops at the first block already decided.
    """
    reachable: dict[bytes, bool] = dict.fromkeys(absent, False)
    for start in parents:
        if start in reachable:
            continue
        path: list[bytes] = []
        key: bytes | None = start
        while True:
            assert key is not None
            known = reachable.get(key)
            if known is not None:
                ok = known
                break
            if key not in parents:
                ok = False  # the parent is not on disk
                break
            path.append(key)
            reachable[key] = False  # provisional: meeting it again on this walk means a cycle
            key = parents[key]
            if key is None:
                ok = True  # a chain head
                break
        for k in path:
            reachable[k] = ok
    skip = set(absent)
    return {k for k, ok in reachable.items() if not ok and k in parents and k not in skip}


def _checksum(buf: torch.Tensor | np.ndarray) -> int:
    return xxhash.xxh3_64_intdigest(cast(Any, buffer_array(buf)))


def _on_host(buf: torch.Tensor | np.ndarray) -> bool:
    return isinstance(buf, np.ndarray) or buf.device.type == "cpu"


# LMDB allows one environment handle per path per process, so a second DiskStore on the same tier in this
# process (writer or reader) is refused here with a clear message instead of LMDB's.
_OPEN_HERE: dict[str, str] = {}
_OPEN_HERE_LOCK = threading.Lock()


def _shard_slots(shard: int, capacity: int, nshards: int) -> int:
    return max(0, (capacity - shard + nshards - 1) // nshards)


class _WriterLock:
    """``flock`` on ``PATH/writer.lock``: one writer process per tier; the holder's pid and host inside.

    Raises:
        TierLockedError: another open file description (another process, or another opener) holds the lock.
        DiskTierError: the lock file cannot be created or locked.
    """

    def __init__(self, root: str) -> None:
        path = os.path.join(root, _LOCK_FILE)
        with translated(f"opening the writer lock of disk tier {root}"):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            try:
                holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "an unknown process"
            except OSError:
                holder = "an unknown process"
            os.close(fd)
            raise locked(root, holder, exc) from exc
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise disk_error(exc, f"writing the writer lock of disk tier {root}") from exc
        self._fd: int | None = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing the last fd of the open file description drops the flock


class DiskStore:
    """Block bytes on disk plus their registry rows, safe against crashes.

    Args:
        config: path, capacity (``num_blocks``), backend and durability.
        model: block geometry and dtype; its fingerprint is recorded and checked on reopen.
        hash_algorithm: name of the sequence-hash algorithm ("sha256" or "xxh3_128"); recorded and checked.
        namespace: model name/revision; recorded and checked.
        readonly: open without the writer lock and never write (reads alongside a live writer).
        backend: an already-built backend to use instead of the one ``config.backend`` names (e.g. a
            :class:`~tiered_kv.storage.disk.faults.FaultInjectingBackend`).

    Raises:
        ConfigError: ``hash_algorithm``/``namespace`` invalid, or ``backend="kvikio"`` cannot work here.
        LayoutMismatchError: the tier was created for another fingerprint, hash algorithm or namespace
            (checked before anything is written).
        TierLockedError: another process (or another opener in this one) holds the writer lock.
        DiskTierError: unknown format version, I/O or LMDB failure.
        DiskFullError: the files cannot be preallocated.

    Thread safety: every method may be called from several threads at once.
    """

    def __init__(
        self,
        config: DiskConfig,
        model: ModelConfig,
        *,
        hash_algorithm: str,
        namespace: str,
        readonly: bool = False,
        backend: DiskBackend | None = None,
    ) -> None:
        if hash_algorithm not in HASH_ALGORITHMS:
            raise ConfigError("hash_algorithm", hash_algorithm, f"must be one of {', '.join(HASH_ALGORITHMS)}")
        if not isinstance(namespace, str) or not namespace:
            raise ConfigError("namespace", namespace, "must be a non-empty str")
        self.root = os.path.abspath(os.fspath(config.path))
        self.config = config
        self.model = model
        self.hash_algorithm = hash_algorithm
        self.namespace = namespace
        self.readonly = readonly
        self.durability = config.durability
        self.block_size = model.block_size_bytes
        self.corrupt_count = 0

        # Lock order: _commit_lock before _lock, never the other way. Callers' locks come first: the disk pool
        # calls in with its own locks held (its register lock around write_blocks/commit_written, its pool lock
        # around delete/touch), so nothing here may call back into a pool.
        self._lock = threading.Lock()  # in-memory maps; never held across I/O or commits
        self._commit_lock = threading.Lock()  # serialises registry write transactions and their map updates
        self._rows: dict[bytes, Row] = {}
        self._by_slot: dict[int, bytes] = {}
        self._inflight: set[int] = set()  # slots being written by an uncommitted batch
        self._pending_touch: set[bytes] = set()
        # Rule 2: deletions not committed yet (hash -> its row), and the slots they free (slot -> hash). The rows
        # are gone from _rows/_by_slot already; a slot in _dying is not written until its deletion commits.
        self._pending_delete: dict[bytes, Row] = {}
        self._dying: dict[int, bytes] = {}
        # Rule 1: rows in the maps but not committed yet ("batch" and "none"), and the committer that commits them.
        self._pending_put: dict[bytes, Row] = {}
        self._work = threading.Condition(self._lock)  # queued work, committed passes and urgent waiters
        self._urgent = 0  # writers waiting for a commit (rules 1 and 2)
        self._queued_seq = 0  # write batches queued so far (rule 1) ...
        self._committed_seq = 0  # ... and how many of them a transaction has committed
        self._committer: threading.Thread | None = None
        self._data_dirty = False  # data written since the batch syncer last ran
        self._closed = False
        self._stop = threading.Event()
        self._syncer: threading.Thread | None = None
        self._writer_lock: _WriterLock | None = None
        self._registry: Registry | None = None
        self._backend_opened = False
        self._registered_here = False
        self.last_sync_error: DiskTierError | None = None

        self.backend = backend if backend is not None else self._make_backend(config.backend)
        try:
            self._open()
        except BaseException:
            self._teardown()
            raise

    # -- opening ----------------------------------------------------------------------------------
    @staticmethod
    def _make_backend(name: str) -> DiskBackend:
        if name == "posix":
            return PosixBackend()
        reason = kvikio_unavailable_reason()
        if name == "kvikio":
            if reason is not None:
                raise ConfigError("backend", name, f"the kvikio backend cannot work here: {reason}")
            return KvikioBackend()
        if reason is None:  # auto
            return KvikioBackend()
        logger.info("disk backend auto -> posix (%s)", reason)
        return PosixBackend()

    def _expected_meta(self, capacity: int) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.model.fingerprint(),
            "hash_algorithm": self.hash_algorithm,
            "namespace": self.namespace,
            "capacity": capacity,
            "block_size": self.block_size,
            "slot_stride": round_up(self.block_size, SLOT_ALIGNMENT),
            "layout": {"kind": _LAYOUT_KIND, "nshards": _NSHARDS, "file_pattern": _FILE_PATTERN},
            "model": asdict(self.model),
            "created": time.time(),
        }

    def _check_meta(self, meta: dict[str, Any]) -> None:
        """Refuse a tier made by another format/model/algorithm/namespace. Writes nothing."""
        check_format_version(meta, self.root)
        mine = {
            "fingerprint": self.model.fingerprint(),
            "hash_algorithm": self.hash_algorithm,
            "namespace": self.namespace,
        }
        diffs = [f"{k} {meta.get(k)!r} (tier) != {v!r} (opener)" for k, v in mine.items() if meta.get(k) != v]
        if diffs:
            raise LayoutMismatchError(f"disk tier {self.root} was made for another layout: " + "; ".join(diffs))
        layout = meta.get("layout") or {}
        if layout.get("kind") != _LAYOUT_KIND or not isinstance(layout.get("nshards"), int):
            raise DiskTierError(f"disk tier {self.root} has an unknown file layout {layout!r}")

    def _open(self) -> None:
        with _OPEN_HERE_LOCK:
            mode = _OPEN_HERE.get(self.root)
            if mode is not None:
                why = "LMDB allows one handle per process: share that DiskStore"
                if mode == "writer" and not self.readonly:
                    raise TierLockedError(self.root, f"this process (pid={os.getpid()}, writer)", why)
                raise DiskTierError(
                    f"disk tier {self.root} is already open in this process (pid={os.getpid()}, {mode}); {why}"
                )
            _OPEN_HERE[self.root] = "read-only" if self.readonly else "writer"
        self._registered_here = True
        exists = Registry.exists(self.root)
        if exists:
            # Check the meta record through a read-only environment BEFORE taking the writer lock or
            # opening for writing: a mismatched opener must change nothing on disk.
            self._check_meta(read_tier_meta(self.root))
        elif self.readonly:
            raise DiskTierError(f"no disk tier at {self.root}")

        if self.readonly:
            self._registry = Registry(self.root, readonly=True, map_size=0, sync=False)
            meta = self._registry.read_meta()
            if meta is None:
                raise DiskTierError(f"disk tier at {self.root} is not initialised (no meta record)")
            self._check_meta(meta)
            self._apply_meta(meta)
            self._rows = _padded(self._registry.load_rows())
            self._by_slot = {row.slot: key for key, row in self._rows.items()}
            self._open_backend(readonly=True)
            return

        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            raise disk_error(exc, f"creating {self.root}") from exc
        self._writer_lock = _WriterLock(self.root)
        want = self.config.num_blocks
        map_size = max(_MIN_MAP_SIZE, want * _MAP_BYTES_PER_BLOCK)
        # Rules 1, 3, 4: "sync" syncs data and meta pages at each commit; "batch" syncs the data pages
        # (MDB_NOMETASYNC: integrity through power loss, the last transaction may be undone; MDB_NOSYNC when
        # _BATCH_SYNCS_COMMITS is switched off); "none" neither.
        self._registry = Registry(
            self.root,
            readonly=False,
            map_size=map_size,
            sync=self.durability == "sync" or (self.durability == "batch" and _BATCH_SYNCS_COMMITS),
            metasync=self.durability == "sync",
        )
        meta = self._registry.read_meta()
        if meta is None:
            # Fresh tier. Files first, meta last: a crash before the meta commit leaves a tier that the
            # next open treats as fresh again (files are re-sized, nothing points into them).
            meta = self._expected_meta(want)
            self._apply_meta(meta)
            self._size_files(want)
            self._registry.commit(meta=meta)
            self._registry.sync()
            self._open_backend(readonly=False)
        else:
            self._check_meta(meta)
            self._apply_meta(meta)
            old = int(meta["capacity"])
            self._rows = self._registry.load_rows()
            if meta.get("format_version") != FORMAT_VERSION:
                meta = self._migrate(meta)  # before anything below writes the meta record back
            self._reconcile()
            # Grow first (and keep the old files whole until a shrink has moved the survivors).
            self._size_files(max(old, want), shrink=False)
            self._open_backend(readonly=False)
            if want > old:
                meta = {**meta, "capacity": want}
                self._registry.commit(meta=meta)  # after the files were grown (rule 6)
                self._registry.sync()
            elif want < old or max(map(itemgetter(0), self._rows.values()), default=-1) >= want:  # slot: C pass
                self._shrink(meta, want)
            self._size_files(want)  # exact sizes (also finishes a shrink interrupted after its commit)
            self.capacity_ = want
        self._syncer = threading.Thread(target=self._sync_loop, name="tiered-kv-disk-sync", daemon=True)
        self._syncer.start()
        self._committer = threading.Thread(target=self._commit_loop, name="tiered-kv-disk-commit", daemon=True)
        self._committer.start()
        logger.info(
            "disk tier %s open for writing: %d/%d blocks used, backend %s, durability %s",
            self.root,
            len(self._rows),
            self.capacity_,
            self.backend_name,
            self.durability,
        )

    def _open_backend(self, *, readonly: bool) -> None:
        with translated(f"opening the data files of disk tier {self.root}"):
            self.backend.open(self._paths(), readonly=readonly)
        self._backend_opened = True

    def _apply_meta(self, meta: dict[str, Any]) -> None:
        self.capacity_ = int(meta["capacity"])
        self.stride = int(meta["slot_stride"])
        self.nshards = int(meta["layout"]["nshards"])
        self._file_pattern = str(meta["layout"]["file_pattern"])
        self._meta = meta
        if self.stride < self.block_size:
            raise DiskTierError(f"disk tier {self.root}: slot stride {self.stride} < block size {self.block_size}")

    def _paths(self) -> list[str]:
        return [os.path.join(self.root, self._file_pattern.format(k)) for k in range(self.nshards)]

    def _size_files(self, capacity: int, *, shrink: bool = True) -> None:
        """Make every shard exactly (or, with shrink=False, at least) the size ``capacity`` needs; synced."""
        try:
            for k, path in enumerate(self._paths()):
                want = _shard_slots(k, capacity, self.nshards) * self.stride
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    size = os.fstat(fd).st_size
                    if size < want:
                        os.posix_fallocate(fd, 0, want)
                    elif size > want and shrink:
                        os.ftruncate(fd, want)
                    else:
                        continue
                    os.fsync(fd)
                finally:
                    os.close(fd)
            dfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)  # the new file names themselves must survive a crash
            finally:
                os.close(dfd)
        except OSError as exc:
            raise disk_error(exc, f"sizing the data files of {self.root} for {capacity} blocks") from exc

    def _reconcile(self) -> None:
        """Drop malformed rows and all but the newest row of any slot (rule 5)."""
        assert self._registry is not None
        rows = self._rows
        # Fast path, every check a C-level pass: all rows well-formed Rows, non-negative int slots, no slot twice.
        # A million-row tier opens without a Python-level step per row.
        if set(map(type, rows.values())) <= {Row}:
            slots = list(map(itemgetter(0), rows.values()))
            if set(map(type, slots)) <= {int} and min(slots, default=0) >= 0 and len(set(slots)) == len(slots):
                if not set(map(len, rows.values())) <= {len(ROW_FIELDS)}:
                    _padded(rows)
                if set(map(len, rows.values())) <= {len(ROW_FIELDS)}:
                    self._by_slot = dict(zip(slots, rows))
                    return
        bad: list[bytes] = []
        by_slot: dict[int, bytes] = {}
        for key, row in self._rows.items():
            if not is_row(row):
                bad.append(key)
                continue
            row = self._rows[key] = pad_row(row)  # a value changes, no key: safe while iterating
            other = by_slot.get(row.slot)
            if other is not None:
                loser = key if self._rows[other].created >= row.created else other
                bad.append(loser)
                if loser == other:
                    by_slot[row.slot] = key
            else:
                by_slot[row.slot] = key
        if bad:
            logger.warning("disk tier %s: dropping %d malformed or slot-conflicting rows", self.root, len(bad))
            self._registry.commit(deletes=bad)
            self._registry.sync()
            for key in bad:
                self._rows.pop(key, None)
        self._by_slot = by_slot

    def _migrate(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Bring a format-version-1 tier to the current version in place (rule 7); returns the new meta record.

        Version 2 added the parent field: every row gains ``parent = None`` (unknown, so each old block counts as
        a chain head) and the meta record its new version, in ONE transaction, so a crash leaves either the old
        tier or the migrated one. Rows that are not well-formed are left to :meth:`_reconcile`.
        """
        assert self._registry is not None
        version = meta.get("format_version")
        if version != 1:  # _check_meta let it through, so this is a version this code reads but cannot upgrade
            raise DiskTierError(f"disk tier {self.root}: no migration from format version {version!r}")
        puts = {key: pad_row(row) for key, row in self._rows.items() if is_row(row) and len(row) < len(ROW_FIELDS)}
        migrated = {**meta, "format_version": FORMAT_VERSION}
        try:
            self._registry.commit(puts=puts, meta=migrated)
            self._registry.sync()
        except DiskTierError as exc:  # DiskFullError included: the transaction committed nothing
            raise type(exc)(
                f"disk tier {self.root}: cannot migrate it from format version {version} to {FORMAT_VERSION} "
                f"({exc}); it is unchanged, and older tiered_kv versions or read-only openers can still read it"
            ) from exc
        self._meta = migrated
        self._rows.update(puts)
        logger.info(
            "disk tier %s migrated from format version %s to %s (%d rows)", self.root, version, FORMAT_VERSION,
            len(puts),
        )
        return migrated

    def _shrink(self, meta: dict[str, Any], capacity: int) -> None:
        """Keep the most recently used rows that fit in ``capacity`` slots (rule 6)."""
        assert self._registry is not None
        ranked = sorted(self._rows.items(), key=lambda kv: kv[1].last_access, reverse=True)
        keep, drop = ranked[:capacity], [key for key, _ in ranked[capacity:]]
        if drop:
            # Dropped rows go first, durably: their low slots become targets of the copies below.
            self._registry.commit(deletes=drop)
            self._registry.sync()
            for key in drop:
                self._rows.pop(key)
        used_low = {row.slot for _, row in keep if row.slot < capacity}
        free_low = (s for s in range(capacity) if s not in used_low)
        movers = [(key, row, next(free_low)) for key, row in keep if row.slot >= capacity]
        moved, lost = self._copy_to_slots(movers, "shrinking")
        if lost:
            self.corrupt_count += len(lost)
            logger.warning("disk tier %s: %d blocks failed their checksum while shrinking", self.root, len(lost))
        self._registry.commit(puts=moved, deletes=lost, meta={**meta, "capacity": capacity})
        self._registry.sync()
        for key in lost:
            self._rows.pop(key)
        self._rows.update(moved)
        self._by_slot = {row.slot: key for key, row in self._rows.items()}
        logger.info(
            "disk tier %s shrunk to %d blocks: %d dropped, %d moved, %d corrupt",
            self.root,
            capacity,
            len(drop),
            len(moved),
            len(lost),
        )

    def _copy_to_slots(
        self, movers: Sequence[tuple[bytes, Row, int]], why: str
    ) -> tuple[dict[bytes, Row], list[bytes]]:
        """Copy blocks to free slots (verified on the way) and sync; rows are the caller's to commit after.

        Returns the rows pointing at the new slots, and the hashes whose old copy failed its checksum.
        """
        moved: dict[bytes, Row] = {}
        lost: list[bytes] = []
        per = max(1, _IO_BATCH_BYTES // self.stride)
        for start in range(0, len(movers), per):
            batch = movers[start : start + per]
            buf = aligned_empty(len(batch) * self.block_size).view(len(batch), self.block_size)
            results = self.backend.pread_blocks([self._op(row.slot, buf[i]) for i, (_, row, _) in enumerate(batch)])
            good = []
            for i, (key, row, new_slot) in enumerate(batch):
                if results[i] is None and _checksum(buf[i]) == row.checksum:
                    good.append(i)
                    moved[key] = row.moved(new_slot)
                else:
                    lost.append(key)
            try:
                self.backend.pwrite_blocks([self._op(batch[i][2], buf[i]) for i in good])
            except OSError as exc:
                raise disk_error(exc, f"moving blocks while {why} {self.root}") from exc
        try:
            self.backend.sync()  # copies durable before any row points at them (rule 1)
        except OSError as exc:
            raise disk_error(exc, f"syncing moved blocks of {self.root}") from exc
        return moved, lost

    def copy_to(self, path: str | os.PathLike[str]) -> None:
        """Copy the tier, as a ``kill -9`` at this instant would leave it, into the new directory ``path``.

        The copy holds the committed rows (queued deletions not applied, as after a crash: rule 2) and the bytes
        they point at; blocks being written but not committed yet are unreferenced there. Consistent while the
        tier is in use: no registry transaction runs during the copy (``_commit_lock``), LMDB copies its
        environment from one read transaction, and no slot a committed row points at is written meanwhile
        (rules 1 and 2). Open ``path`` as a tier of its own (a backup, or a crash test's restart).

        Raises:
            DiskTierError: ``path`` exists, or an I/O or LMDB failure.
        """
        reg = self._check_open()
        dest = os.path.abspath(os.fspath(path))
        try:
            os.makedirs(dest)
            with self._commit_lock:
                for src in self._paths():
                    shutil.copyfile(src, os.path.join(dest, os.path.basename(src)))
                os.makedirs(os.path.join(dest, REGISTRY_DIR))
                reg.copy(os.path.join(dest, REGISTRY_DIR))
        except OSError as exc:
            raise disk_error(exc, f"copying the disk tier {self.root} to {dest}") from exc

    def compact(self, exclude: Iterable[int] = ()) -> dict[bytes, tuple[int, int]]:
        """Move live blocks into the lowest free slots and shrink the data files to the live extent.

        Crash-safe by the same rules as a write: each moved block is copied to a free slot (no row points there)
        and synced, then ONE transaction points the rows at their new slots, and only after that commit are the
        files truncated. A crash at any point leaves every row pointing at intact data. Blocks that fail their
        checksum while being moved are dropped (counted as corrupt). Slots above the new extent are written
        again on demand (the files grow) and preallocated again at the next open.

        Args:
            exclude: slots that must not move (blocks the caller holds or is writing).

        Returns:
            ``{hash: (old_slot, new_slot)}`` of the moved blocks.
        """
        reg = self._check_open(write=True)
        pinned = set(exclude)
        with self._commit_lock:
            if self._pending_delete or self._pending_put:
                self._commit()  # rules 1, 2: the slots freed by queued deletions become copy targets below
            with self._lock:
                rows = dict(self._rows)
                inflight = set(self._inflight)
            live = len(rows)
            used = {row.slot for row in rows.values()}
            targets = [s for s in range(live) if s not in used and s not in pinned and s not in inflight]
            movers = sorted(
                ((k, row) for k, row in rows.items() if row.slot >= live and row.slot not in pinned),
                key=lambda kr: kr[1].slot,
            )[: len(targets)]
            moved, lost = self._copy_to_slots(
                [(key, row, new_slot) for (key, row), new_slot in zip(movers, targets)], "compacting"
            )
            if moved or lost:
                self._commit(puts=moved, deletes=lost)
                reg.sync()
            with self._lock:
                for key in lost:
                    self._rows.pop(key, None)
                self._rows.update(moved)
                self._by_slot = {row.slot: key for key, row in self._rows.items()}
                self.corrupt_count += len(lost)
                extent = max(self._by_slot, default=-1) + 1
                extent = max(extent, max(inflight, default=-1) + 1, max(pinned, default=-1) + 1)
        # Only after the commit: the slots above the extent hold no live row any more.
        self._size_files(extent, shrink=True)
        logger.info("disk tier %s compacted: %d moved, %d corrupt, files cover %d slots", self.root, len(moved),
                    len(lost), extent)
        return {k: (rows[k].slot, row.slot) for k, row in moved.items()}

    # -- properties ---------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Number of slots (``config.num_blocks`` for a writer, the recorded capacity when read-only)."""
        return self.capacity_

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._closed

    @property
    def backend_name(self) -> str:
        """Backend name: "posix", "kvikio" or a wrapper's name such as "faults(posix)"."""
        return self.backend.name

    # -- helpers ------------------------------------------------------------------------------------
    def _op(self, slot: int, buf: torch.Tensor | np.ndarray) -> IoOp:
        return IoOp(slot % self.nshards, (slot // self.nshards) * self.stride, buf)

    def _check_open(self, write: bool = False) -> Registry:
        if self._closed or self._registry is None:
            raise DiskTierError(f"disk tier {self.root} is closed")
        if write and self.readonly:
            raise DiskTierError(f"disk tier {self.root} is open read-only")
        return self._registry

    def _check_hash(self, key: object, what: str = "sequence hash") -> bytes:
        try:
            # Plain bytes: a stored SequenceHash would keep its whole chain alive.
            return bytes(check_hash(key, self.hash_algorithm, f"{self.hash_algorithm} {what}"))
        except ValueError as exc:
            raise DiskTierError(str(exc)) from None

    def _check_tensor(self, t: torch.Tensor, n: int, what: str) -> None:
        shape = (n, *self.model.block_shape)
        if tuple(t.shape) != shape or t.dtype != self.model.torch_dtype:
            raise DiskTierError(
                f"{what} must be {self.model.dtype} shaped {list(shape)}, got {t.dtype} {list(t.shape)}"
            )
        if t.is_cuda and not self.backend.accepts_cuda and what == "out":
            raise DiskTierError(f"backend {self.backend_name} cannot read into CUDA memory; pass a CPU tensor")

    def _flat_blocks(
        self, data: torch.Tensor | Sequence[torch.Tensor] | Sequence[np.ndarray], n: int, what: str
    ) -> list[torch.Tensor] | list[np.ndarray]:
        """``n`` one-dimensional uint8 views, one per block, of a batch tensor, a sequence of block tensors, or a
        sequence of 1-D uint8 numpy arrays of one block each (host byte rows, e.g. ``TensorArena.byte_rows``).

        For a backend that ``accepts_numpy``, host memory is handed over as numpy rows: one tensor view per block
        costs microseconds to build and again to turn back into memory the I/O worker can use.
        """
        if isinstance(data, torch.Tensor):
            self._check_tensor(data, n, what)
            if data.is_cuda and not self.backend.accepts_cuda:
                if what == "out":
                    raise DiskTierError(f"backend {self.backend_name} cannot read into CUDA memory; pass a CPU tensor")
                data = data.cpu()
            if what == "out" and not data.is_contiguous():
                raise DiskTierError("out must be contiguous")
            if not n:
                return []
            rows = data.contiguous().view(torch.uint8).reshape(n, self.block_size)
            return list(rows.numpy()) if self.backend.accepts_numpy and not rows.is_cuda else list(rows)
        blocks: list[Any] = list(data)
        if len(blocks) != n:
            raise DiskTierError(f"{what}: expected {n} block tensors, got {len(blocks)}")
        if blocks and type(blocks[0]) is np.ndarray:
            size = self.block_size
            for i, a in enumerate(blocks):
                if type(a) is not np.ndarray or a.dtype != np.uint8 or a.shape != (size,) or not a.flags.c_contiguous:
                    raise DiskTierError(
                        f"{what}[{i}] must be a contiguous 1-D uint8 array of {size} bytes (one block), got "
                        f"{getattr(a, 'dtype', type(a).__name__)} {list(getattr(a, 'shape', ()))}"
                    )
            if self.backend.accepts_numpy:
                return blocks
            return [torch.from_numpy(a) for a in blocks]
        shape, dtype = self.model.block_shape, self.model.torch_dtype
        out = []
        for i, t in enumerate(blocks):
            if tuple(t.shape) != shape or t.dtype != dtype or not t.is_contiguous():
                raise DiskTierError(
                    f"{what}[{i}] must be a contiguous {self.model.dtype} tensor shaped {list(shape)}, "
                    f"got {t.dtype} {list(t.shape)}"
                )
            if t.is_cuda and not self.backend.accepts_cuda:
                if what == "out":
                    raise DiskTierError(f"backend {self.backend_name} cannot read into CUDA memory; pass a CPU tensor")
                t = t.cpu()
            out.append(t.view(torch.uint8).reshape(self.block_size))
        return out

    def _row_extras(
        self,
        hashes: Sequence[bytes],
        keys: Sequence[bytes],
        tokens: Sequence[bytes | None] | None,
        parents: Sequence[bytes | None] | None,
    ) -> list[tuple[bytes | None, bytes | None]]:
        """The ``(tokens, parent)`` row fields of each block of a write batch, checked (see :meth:`write_blocks`)."""
        n = len(keys)
        if tokens is not None and len(tokens) != n:
            raise DiskTierError(f"{n} hashes but {len(tokens)} token entries")
        if parents is None:
            parents = [getattr(h, "parent", None) for h in hashes]
        elif len(parents) != n:
            raise DiskTierError(f"{n} hashes but {len(parents)} parents")
        parent_keys: list[bytes | None] = []
        for key, p in zip(keys, parents, strict=True):
            if p is None:
                parent_keys.append(None)
                continue
            pk = self._check_hash(p, "parent (a sequence hash or None)")
            if pk == key:
                raise DiskTierError(f"block {key.hex()} cannot be its own parent")
            parent_keys.append(pk)
        toks = [None] * n if tokens is None else [None if t is None else bytes(t) for t in tokens]
        return list(zip(toks, parent_keys, strict=True))

    def _commit(self, puts: dict[bytes, Row] | None = None, deletes: Sequence[bytes] = ()) -> None:
        """One registry transaction carrying every queued deletion, ``deletes``, ``puts`` and every pending touch
        (deletions first: a hash deleted and stored again ends up stored).

        Caller holds ``_commit_lock``. Rule 2: once it returns, the slots of the queued deletions may be written.
        """
        assert self._registry is not None
        with self._lock:
            touched, self._pending_touch = self._pending_touch, set()
            queued, self._pending_delete = self._pending_delete, {}
            put_rows, self._pending_put = self._pending_put, {}
            upto = self._queued_seq
            dropped = set(deletes)
            touch_rows = {k: self._rows[k] for k in touched if k in self._rows and k not in dropped}
        try:
            self._registry.commit(puts={**touch_rows, **put_rows, **(puts or {})}, deletes=[*queued, *deletes])
        except BaseException:
            with self._lock:
                self._pending_touch |= touched  # touches are retried with the next commit
                # Queued deletions and rows too, unless a later delete() or write changed the hash meanwhile.
                self._pending_delete = {**queued, **self._pending_delete}
                self._pending_put = {
                    **{k: self._rows[k] for k in put_rows if k in self._rows and k not in self._pending_delete},
                    **self._pending_put,
                }
            raise
        with self._lock:
            self._committed_seq = max(self._committed_seq, upto)  # rule 1: those batches may be acknowledged
            for key, row in queued.items():
                if self._dying.get(row.slot) == key:
                    del self._dying[row.slot]  # rule 2: its deletion is committed, the slot may be written
            self._work.notify_all()  # writers waiting in _await_commit

    def _commit_dying(self, slots: Iterable[int]) -> None:
        """Return once no queued deletion waits on ``slots`` (rule 2: before those slots are written)."""
        wanted = list(slots)
        self._await_commit(lambda: not any(s in self._dying for s in wanted))

    def _await_commit(self, done: Callable[[], bool]) -> None:
        """Return once ``done()`` (checked under ``_lock``) holds, after the commits it waits for.

        The committer's next pass does the commit, with everything else queued (one transaction for all the
        writers waiting, not one each); this thread commits itself if the committer is stopped or has not done it
        within ``_AWAIT_COMMIT_S`` (a failing commit then raises here).
        """
        with self._work:
            if done():
                return
            committer = self._committer
            if committer is not None and committer.is_alive() and not self._stop.is_set():
                self._urgent += 1  # the committer skips its gathering pause
                self._work.notify_all()
                try:
                    deadline = time.monotonic() + _AWAIT_COMMIT_S
                    while not done() and committer.is_alive() and not self._stop.is_set():
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._work.wait(left)
                finally:
                    self._urgent -= 1
            if done():
                return
        with self._commit_lock:
            with self._lock:
                if done():
                    return  # another thread's commit did it meanwhile
            self._commit()

    def _commit_loop(self) -> None:
        """Rule 1's committer: commit whatever is queued, one transaction per pass, passes at least
        ``_COMMIT_INTERVAL_S`` apart."""
        while True:
            with self._work:
                while not (self._pending_put or self._pending_delete) and not self._stop.is_set():
                    self._work.wait()
            if self._stop.is_set():
                return  # close() commits what is left
            try:
                with self._commit_lock:
                    self._commit()
            except DiskTierError as exc:
                # The rows stay queued (and served from memory); the next pass retries.
                self.last_sync_error = exc
                logger.error("disk tier registry commit failed: %s", exc)
                self._stop.wait(_SYNC_INTERVAL_S)
            # Let queued deletions gather (one per eviction), unless a writer waits: for a slot's deletion (rule 2)
            # or for its own rows (they batch up anyway while a commit's fdatasync runs).
            deadline = time.monotonic() + _COMMIT_INTERVAL_S
            with self._work:
                while not self._urgent and not self._pending_put and not self._stop.is_set():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._work.wait(left)

    # -- writes -----------------------------------------------------------------------------------
    def write_blocks(
        self,
        hashes: Sequence[bytes],
        slots: Sequence[int],
        data: torch.Tensor | Sequence[torch.Tensor],
        tokens: Sequence[bytes | None] | None = None,
        parents: Sequence[bytes | None] | None = None,
    ) -> None:
        """Store ``data[i]`` under ``hashes[i]`` in free slot ``slots[i]``; all rows commit together.

        ``tokens[i]``, when given, is recorded in the row (the block's token ids, for verification on match).
        ``parents[i]`` is recorded as the block's parent: the hash of the previous block of its sequence, or None
        for a chain head. Without ``parents``, each hash's own ``.parent`` is used when it has one (a
        :class:`~tiered_kv.hashing.SequenceHash`), else None.

        Args:
            hashes: sequence hashes, none of them already stored.
            slots: free slots (no live row), distinct, in ``[0, capacity)``.
            data: ``[n, num_layers, outer_dim, page_size, inner_dim]`` in the model dtype, or a sequence of ``n``
                contiguous ``[num_layers, outer_dim, page_size, inner_dim]`` tensors (written straight from where
                they lie, no stacking: 4 KiB-aligned ones without a bounce copy under O_DIRECT); CPU, or CUDA for
                a backend that accepts CUDA buffers (others stage it through host memory).

        Raises:
            DiskFullError: ENOSPC, or the registry map is full. No row of this batch is committed.
            DiskTierError: any other I/O or registry failure (no row committed), or bad arguments.
        """
        self._check_open(write=True)
        n = len(hashes)
        if len(slots) != n:
            raise DiskTierError(f"{n} hashes but {len(slots)} slots")
        keys = [self._check_hash(h) for h in hashes]
        if len(set(keys)) != n:
            raise DiskTierError("hashes and slots of one write batch must be distinct")
        with self._lock:
            for key in keys:
                if key in self._rows:
                    raise DiskTierError(f"block {key.hex()} is already stored in slot {self._rows[key].slot}")
        self._row_extras(hashes, keys, tokens, parents)  # bad tokens or parents: refused before any write
        if parents is None:
            parents = [getattr(h, "parent", None) for h in hashes]
        checksums = self.write_data(slots, data)
        self.commit_written(keys, slots, checksums, tokens, parents)

    def write_data(self, slots: Sequence[int], data: torch.Tensor | Sequence[torch.Tensor]) -> list[int]:
        """Write block bytes into free slots WITHOUT registering them; returns their checksums.

        The first half of :meth:`write_blocks`, for a caller that has the bytes before it has the hashes (a disk
        block filled by ``scatter`` and registered later): the bytes go straight from ``data`` to the file, and
        :meth:`commit_written` later commits the rows. Until then the slots hold unreferenced bytes, which a
        crash leaves harmless (rule 1).

        Raises:
            DiskFullError / DiskTierError: as :meth:`write_blocks`; nothing is registered either way.
        """
        self._check_open(write=True)
        n = len(slots)
        flat = self._flat_blocks(data, n, "data")
        if n == 0:
            return []
        slot_list = [int(s) for s in slots]
        if len(set(slot_list)) != n:
            raise DiskTierError("hashes and slots of one write batch must be distinct")
        with self._lock:
            for slot in slot_list:
                if not 0 <= slot < self.capacity_:
                    raise DiskTierError(f"slot {slot} is outside the disk tier (capacity {self.capacity_})")
                if slot in self._by_slot or slot in self._inflight:
                    raise DiskTierError(f"slot {slot} is not free (it holds a live block or is being written)")
            self._inflight.update(slot_list)
        try:
            # Rule 2: a slot freed by a delete() whose row deletion is still queued is overwritten only after
            # that deletion commits (one transaction for everything queued).
            self._commit_dying(slot_list)
            # Checksums come from the caller's bytes, not from what reached the disk: a torn or corrupted
            # write then fails verification on read instead of being blessed here.
            ops = [self._op(s, flat[i]) for i, s in enumerate(slot_list)]
            try:
                if all(map(_on_host, flat)):
                    checksums = self.backend.pwrite_blocks_checksummed(ops, _checksum)  # in the I/O workers
                else:
                    checksums = [_checksum(cast(torch.Tensor, f).cpu()) for f in flat]
                    self.backend.pwrite_blocks(ops)
            except OSError as exc:
                # Nothing was committed: the slots stay free and whatever reached them is unreferenced.
                raise disk_error(exc, f"writing {n} blocks to {self.root}") from exc
            self._data_dirty = True
            return checksums
        finally:
            with self._lock:
                self._inflight.difference_update(slot_list)

    def read_data(self, slot: int, out: torch.Tensor) -> None:
        """Read back the bytes :meth:`write_data` put in a still unregistered slot (no row, so no checksum)."""
        self._check_open(write=True)
        flat = self._flat_blocks([out], 1, "out")
        err = self.backend.pread_blocks([self._op(int(slot), flat[0])])[0]
        if err is not None:
            raise disk_error(err, f"reading back slot {slot} of {self.root}")

    def commit_written(
        self,
        hashes: Sequence[bytes],
        slots: Sequence[int],
        checksums: Sequence[int],
        tokens: Sequence[bytes | None] | None = None,
        parents: Sequence[bytes | None] | None = None,
    ) -> None:
        """Register blocks whose bytes :meth:`write_data` wrote: all rows in one transaction (the second half of
        :meth:`write_blocks`). With ``durability="sync"`` the data is synced first and the rows are committed
        (synced) when this returns; with "batch" and "none" they are committed when this returns, in the
        committer thread's transaction that carries every batch queued meanwhile (rule 1). ``tokens`` and
        ``parents`` as in :meth:`write_blocks`.

        Raises:
            DiskTierError: a slot is taken or a hash already stored (nothing committed); registry failures.
        """
        self._check_open(write=True)
        n = len(hashes)
        if len(slots) != n or len(checksums) != n:
            raise DiskTierError(f"{n} hashes but {len(slots)} slots and {len(checksums)} checksums")
        if n == 0:
            return
        keys = [self._check_hash(h) for h in hashes]
        slot_list = [int(s) for s in slots]
        if len(set(keys)) != n or len(set(slot_list)) != n:
            raise DiskTierError("hashes and slots of one write batch must be distinct")
        extras = self._row_extras(hashes, keys, tokens, parents)
        with self._lock:
            self._check_free(keys, slot_list)
        if self.durability == "sync":
            try:
                self.backend.sync()  # rule 1: data durable before its row commits
            except OSError as exc:
                raise disk_error(exc, f"syncing {n} blocks to {self.root}") from exc
        now = time.time()
        rows: dict[bytes, Row] = {
            k: Row(s, c, self.block_size, now, now, 0, *x)
            for k, s, c, x in zip(keys, slot_list, checksums, extras, strict=True)
        }
        if self.durability != "sync":
            # Rule 1: queued whole (one transaction takes the whole queue) for the committer's next pass, which
            # carries every batch queued meanwhile; acknowledged once committed, so a kill -9 keeps it.
            with self._lock:
                self._check_free(keys, slot_list)  # again: another thread may have taken them meanwhile
                self._rows.update(rows)
                for k, s in zip(keys, slot_list, strict=True):
                    self._by_slot[s] = k
                self._pending_put.update(rows)
                self._queued_seq += 1
                mine = self._queued_seq
                self._work.notify_all()
            try:
                self._await_commit(lambda: self._committed_seq >= mine)
            except BaseException:
                with self._lock:  # not committed: the batch was never stored (as with a synchronous commit)
                    for k, row in rows.items():
                        if self._rows.get(k) is row:
                            del self._rows[k]
                            self._pending_put.pop(k, None)
                            if self._by_slot.get(row.slot) == k:
                                del self._by_slot[row.slot]
                raise
            return
        with self._commit_lock:
            self._commit(puts=rows)  # rule 1: one transaction for the whole batch, after the data
            with self._lock:
                self._rows.update(rows)
                for k, s in zip(keys, slot_list, strict=True):
                    self._by_slot[s] = k

    def _check_free(self, keys: Sequence[bytes], slots: Sequence[int]) -> None:
        """Refuse a batch whose slots are not free or whose hashes are stored. Caller holds ``_lock``."""
        for key, slot in zip(keys, slots, strict=True):
            if not 0 <= slot < self.capacity_ or slot in self._by_slot or slot in self._inflight:
                raise DiskTierError(f"slot {slot} is not a free slot of the disk tier")
            if key in self._rows:
                raise DiskTierError(f"block {key.hex()} is already stored in slot {self._rows[key].slot}")

    def delete(self, hashes: Sequence[bytes]) -> None:
        """Drop the rows of ``hashes`` (unknown ones are ignored); their deletion is group-committed (rule 2).

        When this returns the blocks are gone from lookups and reads, and the caller may reuse their slots: the
        store writes such a slot only after the deletion has committed (the committer's next pass, milliseconds
        later, or right before the slot is written). Until then a crash may bring the rows
        back, pointing at their own intact bytes. :meth:`flush` and :meth:`close` commit the queue.
        """
        self._check_open(write=True)
        keys = [self._check_hash(h) for h in hashes]
        with self._lock:
            self._queue_deletes_locked(keys)

    def _queue_deletes_locked(self, keys: Iterable[bytes], expect: dict[bytes, Row] | None = None) -> list[bytes]:
        """Drop rows from lookups and queue their deletion for the committer (rule 2); returns the keys dropped.

        ``expect``: drop a key only while its row is still that block (a touch may have made a new row of the same
        block; another deletion may have taken it already). Caller holds ``_lock``.
        """
        dropped: list[bytes] = []
        for k in dict.fromkeys(keys):
            row = self._rows.get(k)
            if row is None or (expect is not None and not row.same_block(expect[k])):
                continue
            del self._rows[k]
            if self._by_slot.get(row.slot) == k:
                del self._by_slot[row.slot]
            self._pending_delete[k] = row
            self._dying[row.slot] = k
            self._pending_touch.discard(k)
            self._pending_put.pop(k, None)  # never committed, or committed and now deleted: either way gone
            dropped.append(k)
        if self._pending_delete:
            self._work.notify_all()
        return dropped

    def touch(self, hashes: Sequence[bytes]) -> None:
        """Refresh recency (last_access, hits) of stored blocks; buffered, committed within about a second."""
        self._check_open()
        now = time.time()
        rows = self._rows
        with self._lock:
            for h in hashes:
                row = rows.get(h)
                if row is not None:
                    rows[h] = row.touched(now)
                    if not self.readonly:
                        self._pending_touch.add(h)

    # -- reads ------------------------------------------------------------------------------------
    def alloc_blocks(self, n: int) -> torch.Tensor:
        """A new ``[n, *block_shape]`` CPU tensor in the model dtype, 4 KiB-aligned (reads into it skip the bounce
        copy under O_DIRECT); its contents are undefined."""
        raw = aligned_empty(n * self.block_size)
        return raw.view(self.model.torch_dtype).reshape(n, *self.model.block_shape)

    _alloc = alloc_blocks  # the old private name (storage/disk_tier.py still calls it)

    def _read_verify(
        self, items: Sequence[tuple[bytes, Row]], out: torch.Tensor | list[torch.Tensor] | list[np.ndarray]
    ) -> list[int]:
        """Read ``items`` into ``out`` (a batch, or one flat uint8 view per block); return the indices that failed."""
        n = len(items)
        flat = out if isinstance(out, list) else self._flat_blocks(out, n, "out")
        ops = [self._op(row.slot, flat[i]) for i, (_, row) in enumerate(items)]
        sums: list[int | None]
        if all(map(_on_host, flat)):
            results, sums = self.backend.pread_blocks_checksummed(ops, _checksum)  # checksummed in the I/O workers
        else:
            results = self.backend.pread_blocks(ops)
            sums = [_checksum(cast(torch.Tensor, f).cpu()) if r is None else None for f, r in zip(flat, results)]
        bad: list[int] = []
        for i, (key, row) in enumerate(items):
            err = results[i]
            if err is not None:
                logger.warning("%s", disk_error(err, f"reading block {key.hex()} (slot {row.slot})"))
                bad.append(i)
            elif sums[i] != row.checksum:
                logger.warning(
                    "%s",
                    CorruptBlockError(f"block {key.hex()} in slot {row.slot} of {self.root} failed its checksum"),
                )
                bad.append(i)
        return bad

    def _confirm_readonly(self, items: Sequence[tuple[bytes, Row]]) -> list[bytes]:
        """Read-only openers see a snapshot: a failure is real only if the row is unchanged and fails again."""
        assert self._registry is not None
        still: list[tuple[bytes, Row]] = []
        for key, row in items:
            fresh = self._registry.get(key)
            if fresh is not None and fresh.same_block(row):
                still.append((key, fresh))
        if not still:
            return []
        again = self._read_verify(still, self._alloc(len(still)))
        return [still[i][0] for i in again]

    def _drop_corrupt(self, items: Sequence[tuple[bytes, Row]]) -> list[bytes]:
        """Delete the rows of blocks that failed (if still unchanged); count them. Returns the hashes counted."""
        if self.readonly:
            confirmed = self._confirm_readonly(items)
            with self._lock:
                self.corrupt_count += len(confirmed)
            return confirmed
        # Queued for the committer like any deletion: a concurrent delete() or a second reader of the same block
        # may drop the row first, and a crash before the commit brings back a row that fails its checksum again.
        with self._lock:
            gone = self._queue_deletes_locked([k for k, _ in items], dict(items))
            self.corrupt_count += len(gone)
        return gone

    def read_blocks(self, slots: Sequence[int], out: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int]]:
        """Read the blocks in ``slots`` and verify each against its row's checksum.

        Args:
            slots: slots holding live blocks.
            out: destination ``[n, L, O, P, I]`` in the model dtype (CUDA only for a backend that accepts it);
                a new 4 KiB-aligned CPU tensor when None.

        Returns:
            ``(out, bad)``: ``bad`` lists the indices whose block failed its checksum or could not be read.
            Their rows have been deleted (slots free), they are counted in :attr:`corrupt_count`, and their
            data in ``out`` must not be used.

        Raises:
            DiskTierError: a slot holds no live block, or the store is closed.
        """
        if out is None:
            out = self._alloc(len(slots))
        return out, self.read_into(slots, out)

    def read_into(
        self, slots: Sequence[int], out: torch.Tensor | Sequence[torch.Tensor] | Sequence[np.ndarray]
    ) -> list[int]:
        """Read the blocks in ``slots`` straight into ``out``: a batch tensor (see :meth:`read_blocks`), a
        sequence of contiguous ``[L, O, P, I]`` tensors, one per block (e.g. arena slots: 4 KiB-aligned ones are
        read in place under O_DIRECT, no bounce copy, no staging), or a sequence of 1-D uint8 numpy arrays of one
        block each (host byte rows). Returns the indices that failed, as :meth:`read_blocks` does."""
        self._check_open()
        n = len(slots)
        with self._lock:
            items: list[tuple[bytes, Row]] = []
            for s in slots:
                key = self._by_slot.get(int(s))
                if key is None:
                    raise DiskTierError(f"slot {s} of disk tier {self.root} holds no block")
                items.append((key, self._rows[key]))
        flat = self._flat_blocks(out, n, "out")
        if n == 0:
            return []
        bad = self._read_verify(items, flat)
        if bad:
            self._drop_corrupt([items[i] for i in bad])
        return bad

    # -- registry views -----------------------------------------------------------------------------
    def refresh(self) -> None:
        """Read-only openers: reload the rows from the registry (see the writer's latest commits)."""
        reg = self._check_open()
        if not self.readonly:
            return
        rows = _padded(reg.load_rows())
        with self._lock:
            self._rows = rows
            self._by_slot = {row.slot: key for key, row in rows.items()}

    def entries(self) -> list[Entry]:
        """All live blocks, least recently used first, ties by slot (to rebuild the pool's bookkeeping at open)."""
        with gc_paused():
            items, order = self._lru_order()
            return [_entry(items[i][0], items[i][1]) for i in order]

    def slot_order(self) -> list[tuple[bytes, int, bytes | None, bytes | None]]:
        """``(hash, slot, token ids, parent)`` of every live block in :meth:`entries` order, without building entries.

        What a pool needs to rebuild its bookkeeping at open; about twice as fast as :meth:`entries` on a
        million rows.
        """
        with gc_paused():
            items, order = self._lru_order()
            return [(k, r.slot, r.tokens, r.parent) for k, r in (items[i] for i in order)]

    def _lru_order(self) -> tuple[list[tuple[bytes, Row]], list[int]]:
        self.refresh()
        with self._lock:
            items = list(self._rows.items())
        # numpy's argsort on the access times: ~5x faster than sorting a million Python tuples.
        # Ties (one batch shares a timestamp) are broken by slot so the order is the same after a reopen.
        access = np.fromiter((r.last_access for _, r in items), dtype=np.float64, count=len(items))
        slots = np.fromiter((r.slot for _, r in items), dtype=np.int64, count=len(items))
        return items, np.lexsort((slots, access)).tolist()

    def lookup(self, hash: bytes) -> Entry | None:
        """The entry of ``hash``, or None. Read-only openers look in the registry's latest state."""
        reg = self._check_open()
        key = bytes(hash)
        if self.readonly:
            row = reg.get(key)
            if row is not None:
                with self._lock:
                    old = self._rows.get(key)
                    if old is not None:
                        self._by_slot.pop(old.slot, None)
                    self._rows[key] = row
                    self._by_slot[row.slot] = key
            return None if row is None else _entry(key, row)
        with self._lock:
            row = self._rows.get(key)
        return None if row is None else _entry(key, row)

    def block_location(self, hash: bytes) -> tuple[str, int, int] | None:
        """``(file path relative to the tier directory, byte offset, size in bytes)`` of a block, or None."""
        entry = self.lookup(hash)
        if entry is None:
            return None
        op = self._op(entry.slot, torch.empty(0, dtype=torch.uint8))
        return self._file_pattern.format(op.file_index), op.offset, entry.size

    def stats(self) -> dict[str, Any]:
        """A snapshot of the tier for tools: layout, identity, usage and counters."""
        reg = self._check_open()
        with self._lock:
            used = len(self._rows)
            access = [r.last_access for r in self._rows.values()]
        files = [os.path.basename(p) for p in self._paths()]
        data_bytes = 0
        for p in self._paths():
            with contextlib.suppress(OSError):
                data_bytes += os.stat(p).st_blocks * 512
        return {
            "path": self.root,
            "format_version": self._meta.get("format_version"),  # 1 for a version-1 tier read as it is
            "fingerprint": self.model.fingerprint(),
            "hash_algorithm": self.hash_algorithm,
            "namespace": self.namespace,
            "backend": self.backend_name,
            "direct_io": self.backend.direct_io,
            "durability": self.durability,
            "readonly": self.readonly,
            "capacity": self.capacity_,
            "capacity_blocks": self.capacity_,
            "blocks_used": used,
            "blocks_free": self.capacity_ - used,
            "block_size": self.block_size,
            "slot_stride": self.stride,
            "bytes_used": used * self.block_size,
            "bytes_on_disk": data_bytes + reg.disk_bytes(),
            "oldest": min(access) if access else None,
            "newest": max(access) if access else None,
            "corrupt_count": self.corrupt_count,
            "data_files": files,
            "layout": dict(self._meta["layout"]),
        }

    def verify(self, repair: bool = False, progress: Callable[[int, int], None] | None = None) -> list[bytes]:
        """Read every stored block and check it; returns the hashes of corrupt (or unreadable) blocks.

        Rows whose slot lies outside the capacity are reported too. With ``repair`` (writers only) all
        of them are dropped in one transaction; without it nothing changes. Parents are not looked at:
        :meth:`check` also finds (and drops) the orphans.

        Args:
            repair: drop the reported rows (needs the writer).
            progress: called as ``progress(done, total)`` with the number of blocks read so far, once
                before the first batch and after every batch (for progress bars).
        """
        report = self._verify(repair, progress, chains=False)
        return [*report.corrupt, *report.out_of_range]

    def check(self, repair: bool = False, progress: Callable[[int, int], None] | None = None) -> VerifyReport:
        """:meth:`verify`, and the orphans: blocks that no match can reach because their chain is broken on disk.

        An orphan is a block whose parent is not on disk, or is itself an orphan; blocks found corrupt or outside
        the capacity count as gone. With ``repair`` (writers only) the corrupt blocks, those outside the capacity
        and the orphans are dropped in ONE transaction, children together with their parents, so the tier is
        prefix-closed afterwards and never passes through a state where a child outlives its parent.

        Args:
            repair: drop everything reported (needs the writer).
            progress: as for :meth:`verify`.
        """
        return self._verify(repair, progress, chains=True)

    def orphans(self) -> list[bytes]:
        """Hashes of the blocks whose ancestor chain is broken on disk (see :meth:`check`), by slot; reads no data."""
        self._check_open()
        self.refresh()
        with self._lock:
            parents = {k: r.parent for k, r in self._rows.items()}
            slot = {k: r.slot for k, r in self._rows.items()}
        return sorted(find_orphans(parents), key=slot.__getitem__)

    def _verify(self, repair: bool, progress: Callable[[int, int], None] | None, *, chains: bool) -> VerifyReport:
        self._check_open(write=repair)
        self.refresh()
        with self._lock:
            items = sorted(self._rows.items(), key=lambda kv: kv[1].slot)
        outside = [k for k, r in items if r.slot >= self.capacity_]
        valid = [(k, r) for k, r in items if r.slot < self.capacity_]
        per = max(1, _IO_BATCH_BYTES // self.stride)
        failed: list[tuple[bytes, Row]] = []
        buf = self._alloc(min(per, max(1, len(valid))))
        if progress is not None:
            progress(0, len(valid))
        for start in range(0, len(valid), per):
            batch = valid[start : start + per]
            out = buf[: len(batch)]
            failed.extend(batch[i] for i in self._read_verify(batch, out))
            if progress is not None:
                progress(start + len(batch), len(valid))
        bad = self._confirm_readonly(failed) if self.readonly else [k for k, _ in failed]
        orphans: list[bytes] = []
        if chains:
            # The same snapshot as the reads; blocks about to be reported as bad count as gone.
            found = find_orphans({k: r.parent for k, r in items}, absent=[*bad, *outside])
            orphans = [k for k, _ in items if k in found]
        if repair and (bad or outside or orphans):
            drop = bad + outside + orphans
            with self._commit_lock:
                self._commit(deletes=drop)
                with self._lock:
                    for k in drop:
                        row = self._rows.pop(k, None)
                        if row is not None and self._by_slot.get(row.slot) == k:
                            del self._by_slot[row.slot]
                    self.corrupt_count += len(bad)
        return VerifyReport(
            checked=len(valid),
            corrupt=tuple(bad),
            out_of_range=tuple(outside),
            orphans=tuple(orphans),
            repaired=repair,
        )

    # -- durability -------------------------------------------------------------------------------
    def _sync_all(self) -> None:
        """Data fdatasync, THEN registry sync (rule 3): rows we make durable point at synced data."""
        assert self._registry is not None
        self._data_dirty = False
        try:
            self.backend.sync()
        except OSError as exc:
            self._data_dirty = True
            raise disk_error(exc, f"syncing the data files of {self.root}") from exc
        self._registry.sync()

    def _commit_touches(self) -> None:
        """Commit pending touches, queued rows and deletions (rules 1 and 2), if there are any."""
        if self._pending_touch or self._pending_delete or self._pending_put:
            with self._commit_lock:
                self._commit()

    def _sync_loop(self) -> None:
        while not self._stop.wait(_SYNC_INTERVAL_S):
            try:
                self._commit_touches()
                if self.durability == "batch" and self._data_dirty:
                    self._sync_all()
                self.last_sync_error = None
            except DiskTierError as exc:
                # Keep serving; the next tick retries. Rows that became durable meanwhile are still
                # protected by their checksums (rule 3).
                self.last_sync_error = exc
                logger.error("disk tier background sync failed: %s", exc)

    def flush(self) -> None:
        """Commit queued rows, deletions and touches, fdatasync the data, then sync the registry (every mode).

        Raises:
            DiskTierError: a sync failed.
        """
        self._check_open()
        if self.readonly:
            return
        self._commit_touches()
        self._sync_all()

    def close(self) -> None:
        """Flush, stop the background syncer, close files and release the writer lock. Idempotent."""
        if self._closed:
            return
        error: BaseException | None = None
        self._stop.set()
        with self._work:
            self._work.notify_all()
        for thread in (self._syncer, self._committer):
            if thread is not None:
                thread.join()
        self._syncer = self._committer = None
        if not self.readonly and self._registry is not None:
            try:
                self.flush()
            except DiskTierError as exc:
                error = exc
        self._teardown()
        if error is not None:
            raise error

    def _teardown(self) -> None:
        self._closed = True
        if self._registered_here:
            self._registered_here = False
            with _OPEN_HERE_LOCK:
                _OPEN_HERE.pop(self.root, None)
        self._stop.set()
        if self._backend_opened:
            self._backend_opened = False
            self.backend.close()
        reg, self._registry = self._registry, None
        if reg is not None:
            with contextlib.suppress(DiskTierError):
                reg.close()
        lock, self._writer_lock = self._writer_lock, None
        if lock is not None:
            lock.release()

    def __enter__(self) -> DiskStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries())

    def __len__(self) -> int:
        with self._lock:
            return len(self._rows)

    def __repr__(self) -> str:
        return (
            f"DiskStore({self.root!r}, capacity={getattr(self, 'capacity_', '?')}, backend={self.backend.name!r}, "
            f"{'readonly' if self.readonly else 'writer'})"
        )
