"""The LMDB registry of the disk tier: which block (by sequence hash) lives in which slot, and the format version.

Two named databases in one LMDB environment under ``PATH/registry/``:

* ``blocks``: sequence hash -> one :class:`Row`, stored as a msgpack array of its fields in order:
  ``[slot, checksum, size, created, last_access, hits, tokens, parent]``. Format version 1 rows stop after
  ``hits`` or ``tokens``; :class:`Row`'s defaults (None) fill in the missing fields when they are read.
* ``meta``: ``b"meta"`` -> msgpack map (format version, model fingerprint, hash algorithm, namespace,
  capacity, slot stride, file layout; see :mod:`tiered_kv.storage.disk.store`).

This module owns the on-disk format: :data:`FORMAT_VERSION`, the versions this code reads
(:data:`READABLE_FORMAT_VERSIONS`) and the one check of both (:func:`check_format_version`).

Every public method is one transaction; write transactions begin and commit inside the calling thread
(an LMDB write transaction belongs to the thread that opened it). LMDB (and OS) errors are translated at this
boundary by :func:`tiered_kv.storage.disk._errors.translated`: ``MapFullError`` ->
:class:`~tiered_kv.errors.DiskFullError`, any other ``lmdb.Error`` -> :class:`~tiered_kv.errors.DiskTierError`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from functools import partial
from typing import Any, NamedTuple, cast

import lmdb
import msgpack

from ..._gc import gc_paused
from ...errors import DiskTierError
from ._errors import translated

__all__ = [
    "FORMAT_VERSION",
    "READABLE_FORMAT_VERSIONS",
    "REGISTRY_DIR",
    "ROW_FIELDS",
    "ROW_LENGTHS",
    "Registry",
    "Row",
    "check_format_version",
    "gc_paused",
    "is_row",
    "pad_row",
    "read_tier_meta",
]

#: Subdirectory of the tier holding the LMDB environment.
REGISTRY_DIR = "registry"

#: On-disk format version written into the meta record; an unknown version is refused. Version 2 added the
#: parent field to the rows; a version 1 tier is migrated when opened for writing and read as is otherwise.
FORMAT_VERSION = 2
#: Versions this code opens: read-only openers read them as they are, writers migrate older ones.
READABLE_FORMAT_VERSIONS = (1, 2)


class Row(NamedTuple):
    """One block's registry row (format version 2). Immutable: a touch or a move stores a new row.

    Attributes:
        slot: where the block's bytes are (see the slot layout in :mod:`tiered_kv.storage.disk.store`).
        checksum: xxh3-64 of the block's bytes, computed from the writer's copy before it reached the disk.
        size: bytes of the block (the model's ``block_size_bytes``).
        created: Unix time (seconds, float) the row was committed.
        last_access: Unix time of the last match (or of the commit).
        hits: matches served from this row.
        tokens: the block's token ids as little-endian uint32 bytes, or None when the writer gave none.
        parent: the previous block's sequence hash; None for a chain head (and for every row of format version 1).
    """

    slot: int
    checksum: int
    size: int
    created: float
    last_access: float
    hits: int
    tokens: bytes | None = None
    parent: bytes | None = None

    def touched(self, now: float) -> Row:
        """This row after one more hit at ``now``."""
        return Row(self.slot, self.checksum, self.size, self.created, now, self.hits + 1, self.tokens, self.parent)

    def moved(self, slot: int) -> Row:
        """This row pointing at ``slot`` (the block's bytes were copied there)."""
        return self._replace(slot=slot)

    def same_block(self, other: Row) -> bool:
        """Whether ``other`` is this row's block, touched or not (same slot, checksum and commit time)."""
        return self.slot == other.slot and self.checksum == other.checksum and self.created == other.created


#: The fields of a row, in stored order (format version 2).
ROW_FIELDS = Row._fields
#: What a stored row may hold: 6 or 7 fields (format version 1) or all of them.
ROW_LENGTHS = (6, 7, len(ROW_FIELDS))

# msgpack builds each stored row straight into a Row (a row is a flat array, so the hook sees nothing else):
# ~0.4 s per million rows less than a second pass over decoded lists. Short (version 1) rows come out short;
# pad_row completes them.
_unpack_row = partial(msgpack.unpackb, list_hook=partial(tuple.__new__, Row))


def pad_row(row: Row) -> Row:
    """A format-version-1 row (6 or 7 fields) completed with None fields; a full row as it is."""
    return row if len(row) == len(ROW_FIELDS) else Row(*row)


def is_row(value: object) -> bool:
    """Whether a decoded registry value is a well-formed row (of any readable format version)."""
    return (
        isinstance(value, tuple)
        and len(value) in ROW_LENGTHS
        and type(value[0]) is int
        and value[0] >= 0
    )


def check_format_version(meta: Mapping[str, Any], path: str | os.PathLike[str]) -> int:
    """The format version of a tier's meta record, refused when this code cannot read it.

    Raises:
        DiskTierError: the version is missing or not in :data:`READABLE_FORMAT_VERSIONS`.
    """
    version = meta.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        raise DiskTierError(
            f"disk tier {os.fspath(path)} has format version {version!r}; this tiered_kv reads versions "
            f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}"
        )
    return int(version)


def read_tier_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The meta record of the tier at ``path``, read without the writer lock (alongside a live writer).

    For tools that do not know the model yet: the record names the model, hash algorithm, namespace and
    capacity to open the tier with. Its format version is checked.

    Raises:
        DiskTierError: ``path`` is not a directory holding an initialised tier (the message says which of these
            it is not), its registry cannot be read, or its format version is not one this code reads.
    """
    root = os.fspath(path)
    if not os.path.isdir(root):
        why = "it is not a directory" if os.path.exists(root) else "no such file or directory"
        raise DiskTierError(f"{root} is not a disk tier: {why}")
    if not Registry.exists(root):
        raise DiskTierError(f"{root} is not a disk tier: there is no {REGISTRY_DIR}/data.mdb inside")
    try:
        reg = Registry(root, readonly=True, map_size=0, sync=False)
        try:
            meta = reg.read_meta()
        finally:
            reg.close()
    except DiskTierError as exc:
        raise DiskTierError(f"{root} is not a readable disk tier: {exc}") from exc
    if meta is None:
        raise DiskTierError(f"disk tier at {root} is not initialised (no meta record)")
    check_format_version(meta, root)
    return meta


_META_KEY = b"meta"


class Registry:
    """An open LMDB registry.

    Args:
        directory: the tier directory (the environment lives in ``directory/registry``).
        readonly: open with ``MDB_RDONLY``; uses the normal lock file, so it can read alongside a live writer.
        map_size: maximum size of the map in bytes (sparse; only written pages use disk).
        sync: commits fsync the environment's data pages before they return. When False (LMDB ``MDB_NOSYNC``),
            commits only reach the page cache and :meth:`sync` makes them durable; LMDB documents that a system
            crash (power loss, kernel panic) may then corrupt the environment unless the file system keeps
            write order.
        metasync: commits also fsync the meta page, so a committed transaction is durable when the commit
            returns. Without it (``MDB_NOMETASYNC``) LMDB keeps the environment's integrity through a system
            crash (atomicity, consistency and isolation) and may only undo the last committed transaction
            (py-lmdb, ``Environment(metasync=...)``); the next commit or :meth:`sync` makes it durable.
            Defaults to ``sync``.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        readonly: bool,
        map_size: int,
        sync: bool,
        metasync: bool | None = None,
    ) -> None:
        self.path = os.path.join(os.fspath(directory), REGISTRY_DIR)
        self.readonly = readonly
        with translated(f"opening the disk tier registry {self.path}"):
            if readonly:
                if not os.path.exists(os.path.join(self.path, "data.mdb")):
                    raise DiskTierError(f"no disk tier registry at {self.path}")
                self.env = lmdb.open(self.path, readonly=True, lock=True, max_dbs=2, create=False)
                try:
                    self._meta_db = self.env.open_db(b"meta", create=False)
                    self._blocks_db = self.env.open_db(b"blocks", create=False)
                except lmdb.NotFoundError as exc:
                    self.env.close()
                    raise DiskTierError(f"disk tier registry at {self.path} is not initialised") from exc
            else:
                os.makedirs(self.path, exist_ok=True)
                self.env = lmdb.open(
                    self.path,
                    map_size=map_size,
                    max_dbs=2,
                    sync=sync,
                    metasync=sync if metasync is None else metasync,
                    writemap=False,  # a stray write through a pointer must never reach the file
                )
                # Readers of crashed processes keep old pages pinned; clear them before we grow the file.
                self.env.reader_check()
                self._meta_db = self.env.open_db(b"meta")
                self._blocks_db = self.env.open_db(b"blocks")

    @staticmethod
    def exists(directory: str | os.PathLike[str]) -> bool:
        """Whether ``directory`` holds a registry environment."""
        return os.path.exists(os.path.join(os.fspath(directory), REGISTRY_DIR, "data.mdb"))

    def _begin_read(self) -> lmdb.Transaction:
        try:
            return self.env.begin(buffers=False)
        except lmdb.MapResizedError:
            # The writer grew the map after we opened it: adopt the new size and retry once.
            self.env.set_mapsize(0)
            return self.env.begin(buffers=False)

    def read_meta(self) -> dict[str, Any] | None:
        """The meta record, or None on a fresh environment."""
        with translated("reading the meta record"), self._begin_read() as txn:
            raw = txn.get(_META_KEY, db=self._meta_db)
        return None if raw is None else dict(msgpack.unpackb(raw))

    def load_rows(self) -> dict[bytes, Row]:
        """Every row, by hash (two cursor passes in C, one msgpack decode per row: < 1 s per million rows).

        Version 1 rows come back short (6 or 7 fields): complete them with :func:`pad_row`. A damaged value may
        not be a row at all (:func:`is_row` tells).
        """
        unpack = _unpack_row
        with translated("loading the block rows"), gc_paused(), self._begin_read() as txn:
            # buffers=False: keys come back as bytes, never memoryviews.
            keys = cast(Iterator[bytes], txn.cursor(db=self._blocks_db).iternext(keys=True, values=False))
            values = txn.cursor(db=self._blocks_db).iternext(keys=False, values=True)
            return dict(zip(keys, map(unpack, values), strict=True))

    def get(self, key: bytes) -> Row | None:
        """One row (completed with :func:`pad_row`; None when absent or malformed) in a fresh read transaction
        (sees the writer's latest commit)."""
        with translated("reading a block row"), self._begin_read() as txn:
            raw = txn.get(key, db=self._blocks_db)
        row = None if raw is None else _unpack_row(raw)
        return pad_row(cast(Row, row)) if is_row(row) else None

    def commit(
        self,
        puts: Mapping[bytes, Row] | Iterable[tuple[bytes, Row]] = (),
        deletes: Iterable[bytes] = (),
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        """One write transaction: delete ``deletes``, then put ``puts`` (and ``meta`` if given).

        Raises:
            DiskFullError: the map is full (nothing of this call is committed).
            DiskTierError: any other LMDB failure (nothing of this call is committed).
        """
        if self.readonly:
            raise DiskTierError("the disk tier is open read-only")
        items = puts.items() if isinstance(puts, Mapping) else puts
        pack = msgpack.packb
        with translated("committing block rows"), self.env.begin(write=True) as txn:
            for key in deletes:
                txn.delete(key, db=self._blocks_db)
            for key, row in items:
                txn.put(key, pack(row), db=self._blocks_db)
            if meta is not None:
                txn.put(_META_KEY, pack(dict(meta)), db=self._meta_db)

    def set_map_size(self, map_size: int) -> None:
        """Grow the map (no transaction may be open in this process)."""
        with translated("resizing the map"):
            if map_size > self.env.info()["map_size"]:
                self.env.set_mapsize(map_size)

    def sync(self) -> None:
        """Force committed transactions to stable storage (``env.sync(True)``)."""
        if self.readonly:
            return
        with translated("syncing"):
            self.env.sync(True)

    def copy(self, directory: str | os.PathLike[str]) -> None:
        """Write a consistent copy of the environment (one read transaction) into the empty ``directory``."""
        with translated(f"copying the registry to {os.fspath(directory)}"):
            self.env.copy(os.fspath(directory))

    def disk_bytes(self) -> int:
        """Bytes the environment occupies on disk."""
        try:
            st = os.stat(os.path.join(self.path, "data.mdb"))
        except OSError:
            return 0
        return st.st_blocks * 512

    def close(self) -> None:
        """Close the environment (idempotent)."""
        with translated("closing"):
            self.env.close()
