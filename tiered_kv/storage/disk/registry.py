"""The LMDB registry of the disk tier: which block (by sequence hash) lives in which slot.

Two named databases in one LMDB environment under ``PATH/registry/``:

* ``blocks``: sequence hash -> msgpack array ``[slot, checksum, size, created, last_access, hits, tokens, parent]``
  (checksum: xxh3-64 of the block bytes; times: Unix seconds as floats; tokens: the block's token ids as
  little-endian uint32 bytes, or nil; parent: the previous block's sequence hash, or nil for a chain head).
  Format version 1 rows stop after ``hits`` or ``tokens``; readers treat the missing fields as nil.
* ``meta``: ``b"meta"`` -> msgpack map (format version, model fingerprint, hash algorithm, namespace,
  capacity, slot stride, file layout; see :mod:`tiered_kv.storage.disk.store`).

Every public method is one transaction; write transactions begin and commit inside the calling thread
(an LMDB write transaction belongs to the thread that opened it). LMDB errors are translated here:
``MapFullError`` -> :class:`~tiered_kv.errors.DiskFullError`, any other ``lmdb.Error`` ->
:class:`~tiered_kv.errors.DiskTierError`.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, cast

import lmdb
import msgpack

from ...errors import DiskFullError, DiskTierError

__all__ = ["REGISTRY_DIR", "ROW_FIELDS", "Registry", "Row", "gc_paused", "pad_row"]

#: Subdirectory of the tier holding the LMDB environment.
REGISTRY_DIR = "registry"

#: ``[slot, checksum, size, created, last_access, hits, tokens, parent]`` (a list so touches can update it in
#: place; positions are named in :data:`ROW_FIELDS`).
Row = list

#: The fields of a row, in order (format version 2).
ROW_FIELDS = ("slot", "checksum", "size", "created", "last_access", "hits", "tokens", "parent")
_ROW_LEN = len(ROW_FIELDS)


def pad_row(row: Row) -> Row:
    """Extend a format-version-1 row (6 or 7 fields) in place to the full row, missing fields None; returns it."""
    if len(row) < _ROW_LEN:
        row.extend([None] * (_ROW_LEN - len(row)))
    return row

_META_KEY = b"meta"


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while building millions of small containers (its passes would dominate)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    try:
        yield
    except lmdb.MapFullError as exc:
        raise DiskFullError(f"disk tier registry is full while {what}: {exc}") from exc
    except lmdb.Error as exc:
        raise DiskTierError(f"disk tier registry failed while {what}: {exc}") from exc


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
        with _translated(f"opening {self.path}"):
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
        with _translated("reading the meta record"), self._begin_read() as txn:
            raw = txn.get(_META_KEY, db=self._meta_db)
        return None if raw is None else dict(msgpack.unpackb(raw))

    def load_rows(self) -> dict[bytes, Row]:
        """Every row, by hash (two cursor passes in C, one msgpack decode per row: < 1 s per million rows)."""
        unpack = msgpack.unpackb
        with _translated("loading the block rows"), gc_paused(), self._begin_read() as txn:
            # buffers=False: keys come back as bytes, never memoryviews.
            keys = cast(Iterator[bytes], txn.cursor(db=self._blocks_db).iternext(keys=True, values=False))
            values = txn.cursor(db=self._blocks_db).iternext(keys=False, values=True)
            return dict(zip(keys, map(unpack, values), strict=True))

    def get(self, key: bytes) -> Row | None:
        """One row in a fresh read transaction (sees the writer's latest commit)."""
        with _translated("reading a block row"), self._begin_read() as txn:
            raw = txn.get(key, db=self._blocks_db)
        return None if raw is None else msgpack.unpackb(raw)

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
        with _translated("committing block rows"), self.env.begin(write=True) as txn:
            for key in deletes:
                txn.delete(key, db=self._blocks_db)
            for key, row in items:
                txn.put(key, pack(row), db=self._blocks_db)
            if meta is not None:
                txn.put(_META_KEY, pack(dict(meta)), db=self._meta_db)

    def set_map_size(self, map_size: int) -> None:
        """Grow the map (no transaction may be open in this process)."""
        with _translated("resizing the map"):
            if map_size > self.env.info()["map_size"]:
                self.env.set_mapsize(map_size)

    def sync(self) -> None:
        """Force committed transactions to stable storage (``env.sync(True)``)."""
        if self.readonly:
            return
        with _translated("syncing"):
            self.env.sync(True)

    def copy(self, directory: str | os.PathLike[str]) -> None:
        """Write a consistent copy of the environment (one read transaction) into the empty ``directory``."""
        with _translated(f"copying the registry to {os.fspath(directory)}"):
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
        with _translated("closing"):
            self.env.close()
