"""The disk tier's error boundary: OS, kvikio and LMDB errors become public errors here, and only here.

Backends raise (or return) plain :class:`OSError` with a meaningful ``errno`` (the kvikio backend converts kvikio's
own exceptions to ``OSError(EIO)``); the registry meets ``lmdb.Error``. :func:`disk_error` maps either to the most
specific public error and :func:`translated` applies it to a block of code; callers chain it
(``raise disk_error(exc, what) from exc``) so the backend error stays visible as ``__cause__``.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator

import lmdb

from ...errors import DiskFullError, DiskTierError, TierLockedError

__all__ = ["LOCKED_ERRNOS", "disk_error", "locked", "translated"]

#: What ``flock(LOCK_EX | LOCK_NB)`` reports when another open file description holds the lock.
LOCKED_ERRNOS = frozenset({errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES})
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def disk_error(exc: BaseException, what: str) -> DiskTierError:
    """The public error for a backend error met while doing ``what`` (a phrase: "writing 4 blocks to PATH").

    * ``OSError`` ENOSPC / EDQUOT, ``lmdb.MapFullError`` -> :class:`~tiered_kv.errors.DiskFullError`;
    * any other ``OSError`` or ``lmdb.Error`` -> :class:`~tiered_kv.errors.DiskTierError`;
    * a :class:`~tiered_kv.errors.DiskTierError` (already public) is returned as it is.

    The message names ``what``, the errno and the file when the OS gave one. The caller raises the result
    ``from exc``. (A held writer lock is reported by the lock itself as
    :class:`~tiered_kv.errors.TierLockedError`, with the holder: see :func:`locked`.)
    """
    if isinstance(exc, DiskTierError):
        return exc
    if isinstance(exc, lmdb.MapFullError):
        return DiskFullError(f"{what}: the disk tier registry is full ({exc})")
    if isinstance(exc, lmdb.Error):
        return DiskTierError(f"{what}: the disk tier registry failed ({type(exc).__name__}: {exc})")
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        text = f"{what}: [errno {exc.errno}] {exc.strerror or exc}{where}"
        return DiskFullError(text) if exc.errno in _FULL_ERRNOS else DiskTierError(text)
    return DiskTierError(f"{what}: {type(exc).__name__}: {exc}")


def locked(path: str, holder: str, exc: OSError | None = None) -> DiskTierError:
    """The error for a failed attempt to take the writer lock of the tier at ``path``.

    :class:`~tiered_kv.errors.TierLockedError` naming ``holder`` when another opener holds the lock (``exc`` is
    None, or an ``OSError`` whose errno means "held"); :func:`disk_error` of ``exc`` otherwise.
    """
    if exc is None or exc.errno in LOCKED_ERRNOS:
        return TierLockedError(path, holder)
    return disk_error(exc, f"cannot lock disk tier {path}")


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    """Raise :func:`disk_error` (chained) for any ``OSError`` or ``lmdb.Error`` inside the block."""
    try:
        yield
    except (OSError, lmdb.Error) as exc:
        raise disk_error(exc, what) from exc
