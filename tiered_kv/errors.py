"""The tiered_kv exception tree.

Every error the library raises on purpose derives from :class:`TieredKvError`::

    TieredKvError
    ├── ConfigError (also ValueError)     bad configuration value; names the field and the value
    ├── BlockPoolError                    misuse of a pool or a block
    │   ├── NotEnoughBlocksAvailable      allocation could not be satisfied (.requested, .available)
    │   └── InvalidBlockError             released/foreign/wrong-state block, bad hash, policy misbehaviour
    │       └── BlockNotComplete          registering a block whose data was never written (seed 001)
    ├── DiskTierError                     anything the disk tier could not do (OS and LMDB errors end here)
    │   ├── LayoutMismatchError           existing tier written for another model/hash/namespace
    │   ├── CorruptBlockError             block bytes failed their checksum
    │   └── DiskFullError                 ENOSPC, or the registry map is full
    └── ShutdownError                     the manager was closed

OS, LMDB and kvikio errors are translated where they are caught (``raise DiskTierError(...) from exc``);
they never leak raw and are never swallowed.
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


class ShutdownError(TieredKvError):
    """The manager has been closed; data can no longer be allocated, matched or moved."""
