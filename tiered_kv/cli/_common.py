"""Shared plumbing of the ``tiered-kv`` commands: exit codes, error reporting, JSON and rich output.

Every command is wrapped in :func:`handle_errors`, the one place where failures become an exit code and
ONE line on stderr (``tiered-kv: error: ...``), never a traceback:

* :class:`CliError` carries its own exit code (bad input is :data:`EXIT_BAD_INPUT`);
* a :class:`~tiered_kv.errors.TieredKvError` or an ``OSError`` means the input could not be used
  (:data:`EXIT_BAD_INPUT`);
* anything else is a bug; it is reported on one line too (set ``TIERED_KV_DEBUG=1`` for the traceback).

Human output goes through :func:`stdout_console` (rich tables); ``--json`` output through :func:`emit_json`
(one JSON document on stdout, nothing else there).
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any, NoReturn, ParamSpec, TypeVar

import click
from rich.console import Console

from ..errors import TieredKvError

__all__ = [
    "EXIT_OK",
    "EXIT_FAILED",
    "EXIT_BAD_INPUT",
    "EXIT_LOCKED",
    "CliError",
    "fail",
    "handle_errors",
    "json_option",
    "writeback_option",
    "emit_json",
    "stdout_console",
    "stderr_console",
    "fmt_time",
    "fmt_bytes",
    "finite_or_none",
]

#: Success (for ``disk verify``: the tier is clean).
EXIT_OK = 0
#: The check failed (corrupt blocks found).
EXIT_FAILED = 1
#: Bad input: not a tier, unknown format version, bad hash, unreadable file.
EXIT_BAD_INPUT = 2
#: The tier is locked by a writer and the command needs the writer lock.
EXIT_LOCKED = 3

#: Width used for tables when stdout is not a terminal: full hashes must not be cut for ``grep``/``awk``.
_PIPE_WIDTH = 200

P = ParamSpec("P")
R = TypeVar("R")


class CliError(Exception):
    """A failure to report as one line on stderr, exiting with :attr:`code`.

    Args:
        message: the line to print (without the ``tiered-kv: error:`` prefix).
        code: the exit code (one of the ``EXIT_*`` constants).
    """

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def fail(message: str, code: int) -> NoReturn:
    """Print ``tiered-kv: error: message`` (one line) on stderr and exit with ``code``."""
    click.echo(f"tiered-kv: error: {_one_line(message)}", err=True)
    sys.exit(code)


def handle_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn every failure of a command into one line on stderr and its exit code (see the module docstring)."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except CliError as exc:
            fail(exc.message, exc.code)
        except TieredKvError as exc:
            fail(str(exc), EXIT_BAD_INPUT)
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            fail(f"{where}{exc.strerror or exc}", EXIT_BAD_INPUT)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:
            if os.environ.get("TIERED_KV_DEBUG"):
                raise
            fail(f"unexpected {type(exc).__name__}: {exc} (set TIERED_KV_DEBUG=1 for a traceback)", EXIT_BAD_INPUT)

    return wrapper


def json_option(func: Callable[P, R]) -> Callable[P, R]:
    """The ``--json`` flag of read commands (passed as ``as_json``)."""
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout instead of tables.")(
        func
    )


class _WritebackSeconds(click.ParamType):
    """``DiskConfig.writeback_s`` on a command line: positive seconds, or "none"."""

    name = "SECONDS|none"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float | None:
        if value is None or isinstance(value, float):
            return value
        if str(value).lower() == "none":
            return None
        try:
            seconds = float(value)
        except ValueError:
            self.fail(f'seconds or "none", got {value!r}', param, ctx)
        if not seconds > 0:
            self.fail(f"must be a positive number of seconds, got {value!r}", param, ctx)
        return seconds


def writeback_option(func: Callable[P, R]) -> Callable[P, R]:
    """The ``--writeback-s`` option of the commands that open a disk tier (passed as ``writeback_s``)."""
    return click.option(
        "--writeback-s", "writeback_s", type=_WritebackSeconds(), default="5", show_default=True,
        help='DiskConfig.writeback_s: seconds within which registered blocks reach the disk, or "none" '
             "(write blocks down only when a memory tier evicts them).",
    )(func)


def emit_json(doc: Any) -> None:
    """Write ``doc`` as one JSON document on stdout (strict JSON: NaN/inf must already be replaced)."""
    click.echo(json.dumps(doc, indent=2, allow_nan=False))


def stdout_console() -> Console:
    """A rich console on stdout; wide and colourless when stdout is not a terminal (pipes, files)."""
    if sys.stdout.isatty():
        return Console()
    return Console(width=_PIPE_WIDTH, no_color=True, highlight=False, soft_wrap=False)


def stderr_console() -> Console:
    """A rich console on stderr (progress bars, notes that must not mix into stdout)."""
    return Console(stderr=True)


def fmt_time(ts: float | None) -> str:
    """Local time of a Unix timestamp, to the second; ``-`` for None."""
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts).isoformat(sep=" ", timespec="seconds")


def fmt_bytes(n: int) -> str:
    """``n`` bytes in binary units (``1.5 GiB``), exact bytes below 1 KiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def finite_or_none(x: float) -> float | None:
    """``x``, or None when it is NaN or infinite (strict JSON has no NaN)."""
    return x if math.isfinite(x) else None
