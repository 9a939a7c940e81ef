"""The tiered_kv exception tree: every error the library raises on purpose, in one module.

Every one derives from :class:`TieredKvError`::

    TieredKvError
    ├── ConfigError (also ValueError)     bad configuration value; names the field and the value
    ├── BlockPoolError                    misuse of a pool or a block
    │   ├── NotEnoughBlocksAvailable      allocation could not be satisfied (.requested, .available)
    │   └── InvalidBlockError             released/foreign/wrong-state block, bad hash, policy misbehaviour
    │       └── BlockNotComplete          registering a mutable block nothing was written into
    ├── DiskTierError                     anything the disk tier could not do (OS and LMDB errors end here)
    │   ├── LayoutMismatchError           existing tier written for another model/hash/namespace
    │   ├── CorruptBlockError             block bytes failed their checksum
    │   ├── DiskFullError                 ENOSPC/EDQUOT, or the registry map is full
    │   └── TierLockedError               another opener holds the tier's writer lock (.holder)
    ├── RemoteTierError                   the remote tier was misused (bad hash or tensor, closed store)
    └── ShutdownError                     the manager was closed

Backend errors are translated where they cross into tiered_kv, each boundary in one function, and chained
(``raise X(...) from exc``): never leaked raw, never swallowed.

* Disk: :func:`tiered_kv.storage.disk._errors.disk_error` maps ``OSError`` (kvikio failures arrive as ``OSError``
  too: the kvikio backend converts them) and ``lmdb.Error`` to :class:`DiskFullError`, :class:`TierLockedError`
  or :class:`DiskTierError`.
* Remote: Redis failures (connection errors, timeouts, error replies) are not raised at all: the remote tier turns
  them into misses and dropped writes, counted in its metrics (``tiered_kv.storage.remote._cluster``). Only
  caller mistakes raise :class:`RemoteTierError`.
"""

from __future__ import annotations

__all__ = [
    "TieredKvError",
    "ConfigError",
    "BlockPoolError",
    "NotEnoughBlocksAvailable",
    "InvalidBlockError",
    "BlockNotComplete",
    "DiskTierError",
    "LayoutMismatchError",
    "CorruptBlockError",
    "DiskFullError",
    "TierLockedError",
    "RemoteTierError",
    "ShutdownError",
]


class TieredKvError(Exception):
    """Base class of every error raised by tiered_kv."""


class ConfigError(TieredKvError, ValueError):
    """A configuration value is invalid.

    Attributes:
        field: name of the offending field.
        value: the rejected value.
    """

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field}={value!r}: {reason}")


class BlockPoolError(TieredKvError):
    """A block pool operation was misused or could not be done."""


class NotEnoughBlocksAvailable(BlockPoolError):
    """An allocation asked for more blocks than the pool can provide; nothing was allocated."""

    def __init__(self, requested: int, available: int, tier: str | None = None) -> None:
        self.requested = requested
        self.available = available
        self.tier = tier
        where = f" in the {tier} pool" if tier else ""
        super().__init__(f"requested {requested} blocks{where}, only {available} available")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.requested, self.available, self.tier))


class InvalidBlockError(BlockPoolError):
    """A block handle cannot be used for this operation (released, wrong pool, wrong state)."""


class BlockNotComplete(InvalidBlockError):
    """A mutable block was registered before anything was written into it; nothing was registered."""


class DiskTierError(TieredKvError):
    """The disk tier failed; OS and LMDB errors are chained as ``__cause__``."""


class LayoutMismatchError(DiskTierError):
    """An existing disk tier (or blockset) was made for another model, hash algorithm or namespace."""


class CorruptBlockError(DiskTierError):
    """Stored block bytes do not match their checksum."""


class DiskFullError(DiskTierError):
    """The disk (ENOSPC) or the registry map is full."""


class TierLockedError(DiskTierError):
    """Another opener holds the disk tier's writer lock (one writer per tier; read-only openers need none).

    Attributes:
        path: the tier directory.
        holder: what the holder wrote into the lock file (``"pid=N host=H"``), or ``"an unknown process"``.
    """

    def __init__(self, path: str, holder: str, detail: str = "") -> None:
        self.path = path
        self.holder = holder
        self.detail = detail
        super().__init__(f"disk tier {path} is already open for writing by {holder}{'; ' + detail if detail else ''}")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.path, self.holder, self.detail))


class RemoteTierError(TieredKvError):
    """The remote tier was misused (bad hash, wrong tensor shape, closed store).

    Remote failures (unreachable, slow, corrupt values) are never raised: they are misses or dropped writes.
    """


class ShutdownError(TieredKvError):
    """The manager has been closed; data can no longer be allocated, matched or moved."""
