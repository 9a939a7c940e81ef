"""``tiered-kv disk``: inspect, verify and repair a disk tier.

``verify`` checks each block's checksum and each chain: a block whose parent is not on disk is an orphan, which
no match can reach (``stat`` counts chains and reachable blocks). The read commands (``stat``, ``ls``, ``show``,
``verify`` without ``--repair``) open the tier read-only with the model, hash algorithm and namespace recorded in
its meta record, so only PATH is needed. They never take the writer lock and never change the tier, so they work
while a serving process has it open and is writing to it. ``verify --repair`` opens the tier as its writer and
so needs the writer lock (and migrates a format version 1 tier to version 2, as every writer does).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import click
import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..config import DiskConfig, ModelConfig
from ..errors import DiskTierError, TierLockedError
from ..hashing import hash_length
from ..storage.disk import DiskStore, Entry, find_orphans, read_tier_meta
from . import main
from ._common import (
    EXIT_FAILED,
    EXIT_LOCKED,
    EXIT_OK,
    CliError,
    emit_json,
    finite_or_none,
    fmt_bytes,
    fmt_time,
    handle_errors,
    json_option,
    stderr_console,
    stdout_console,
)

__all__ = ["disk", "open_tier", "parse_hash"]

_HEX = re.compile(r"[0-9a-fA-F]+")
_SORTS = ("slot", "age", "hits", "access")
_MAX_ORPHANS_LISTED = 20  # verify's text output; a broken chain head can orphan thousands (--json lists all)

_path_arg = click.argument("path", type=click.Path(path_type=str))


# -- opening --------------------------------------------------------------------------------------
def _tier_meta(path: str) -> dict[str, Any]:
    """The meta record of the tier at ``path``; each way it can fail (no such path, not a tier, unreadable
    registry, unknown format version) becomes a one-line CliError saying which."""
    try:
        return read_tier_meta(path)
    except DiskTierError as exc:
        raise CliError(str(exc)) from exc


def open_tier(path: str, *, writer: bool = False) -> tuple[DiskStore, dict[str, Any]]:
    """Open the disk tier at ``path`` as recorded in its meta record (model, hash algorithm, namespace).

    Args:
        path: the tier directory.
        writer: take the writer lock and open for writing (``verify --repair``); read-only otherwise.

    Returns:
        The open store (the caller closes it) and the meta record it was opened with.

    Raises:
        CliError: not a tier, unknown format version, malformed meta record (EXIT_BAD_INPUT), or, with
            ``writer``, another process holds the writer lock (EXIT_LOCKED).
        DiskTierError: the registry or a data file cannot be read (the message names the file).
    """
    meta = _tier_meta(path)
    try:
        model = ModelConfig(**meta["model"])
        algorithm = str(meta["hash_algorithm"])
        namespace = str(meta["namespace"])
        capacity = int(meta["capacity"])
        # num_blocks = the recorded capacity: a writer opened for repair must neither grow nor shrink the tier.
        config = DiskConfig(path=path, num_blocks=capacity, backend="posix", durability="sync" if writer else "batch")
    except (KeyError, TypeError, ValueError) as exc:
        raise CliError(f"{path}: the tier's meta record is malformed ({type(exc).__name__}: {exc})") from exc
    try:
        store = DiskStore(config, model, hash_algorithm=algorithm, namespace=namespace, readonly=not writer)
    except TierLockedError as exc:
        raise CliError(f"{exc}; this command needs the writer lock: stop that process first", EXIT_LOCKED) from exc
    return store, meta


@contextlib.contextmanager
def _opened(path: str, *, writer: bool = False) -> Iterator[DiskStore]:
    store, _ = open_tier(path, writer=writer)
    try:
        yield store
    finally:
        store.close()


def parse_hash(text: str, algorithm: str) -> bytes:
    """The bytes of a sequence hash given as hex (either case), checked against ``algorithm``'s length.

    Raises:
        CliError: not hexadecimal, or the wrong length.
    """
    s = text.strip()
    if not _HEX.fullmatch(s):
        raise CliError(f"HASH {text!r} is not hexadecimal")
    try:
        want: int | None = hash_length(algorithm)
    except ValueError:  # a tier of an algorithm this version does not know: any even length will do
        want = None
    if want is not None and len(s) != 2 * want:
        raise CliError(f"HASH {text!r} has {len(s)} hex digits; a {algorithm} hash of this tier has {2 * want}")
    if len(s) % 2:
        raise CliError(f"HASH {text!r} has an odd number of hex digits")
    return bytes.fromhex(s)


# -- commands -------------------------------------------------------------------------------------
@main.group()
def disk() -> None:
    """Inspect, verify and repair a disk tier (read commands never change it)."""
    # The store logs each checksum failure as a warning; these commands report them in their own output, so
    # keep Python's last-resort handler from printing them again (TIERED_KV_DEBUG=1 shows them).
    if not os.environ.get("TIERED_KV_DEBUG"):
        logging.getLogger("tiered_kv").addHandler(logging.NullHandler())


def _hit_histogram(hits: np.ndarray) -> dict[str, int]:
    """Blocks per hit-count bucket: ``0``, ``1``, ``2-3``, ``4-7``, ... (powers of two), only up to the max."""
    out: dict[str, int] = {}
    if hits.size == 0:
        return out
    out["0"] = int((hits == 0).sum())
    lo = 1
    top = int(hits.max())
    while lo <= top:
        hi = 2 * lo - 1
        out[str(lo) if lo == hi else f"{lo}-{hi}"] = int(((hits >= lo) & (hits <= hi)).sum())
        lo *= 2
    return out


def _entry_doc(e: Entry) -> dict[str, Any]:
    return {
        "hash": e.hash.hex(),
        "slot": e.slot,
        "size": e.size,
        "created": e.created,
        "last_access": e.last_access,
        "hits": e.hits,
    }


@disk.command()
@_path_arg
@json_option
@handle_errors
def stat(path: str, as_json: bool) -> None:
    """Summary of a tier: identity, layout, usage, ages, hits."""
    store, meta = open_tier(path)
    try:
        entries = store.entries()
        s = store.stats()  # the same registry snapshot as ``entries``
    finally:
        store.close()
    s.pop("durability", None)  # this reader's setting, not the tier's (the writer's is not recorded)
    hits = np.fromiter((e.hits for e in entries), dtype=np.int64, count=len(entries))
    # Chains and reachability from the same snapshot as everything else here (no second registry read).
    orphans = find_orphans({e.hash: e.parent for e in entries})
    chains = sum(e.parent is None for e in entries)
    oldest = min(entries, key=lambda e: (e.created, e.slot), default=None)
    newest = max(entries, key=lambda e: (e.created, e.slot), default=None)
    doc: dict[str, Any] = {
        **s,
        "model": meta.get("model"),
        "tier_created": meta.get("created"),
        "oldest_block": None if oldest is None else {"hash": oldest.hash.hex(), "created": oldest.created},
        "newest_block": None if newest is None else {"hash": newest.hash.hex(), "created": newest.created},
        "least_recent_access": s["oldest"],
        "most_recent_access": s["newest"],
        "hits_total": int(hits.sum()),
        "hit_histogram": _hit_histogram(hits),
        "checksum_failures": s["corrupt_count"],
        "chains": chains,  # chain heads: blocks with no parent, where every match starts
        "reachable_blocks": len(entries) - len(orphans),
        "orphan_blocks": len(orphans),  # no match can reach them: a block of their chain is not on disk
    }
    if as_json:
        emit_json(doc)
        return

    cap = s["capacity_blocks"]
    used = s["blocks_used"]
    model = meta.get("model") or {}
    table = Table(title=f"disk tier {s['path']}", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    layout = s["layout"]
    rows: list[tuple[str, str]] = [
        ("format version", str(s["format_version"])),
        ("layout", f"{layout.get('kind')}, {layout.get('nshards')} data files, slot stride {s['slot_stride']}"),
        ("model", ", ".join(f"{k}={v}" for k, v in model.items())),
        ("fingerprint", s["fingerprint"]),
        ("hash algorithm", s["hash_algorithm"]),
        ("namespace", s["namespace"]),
        ("backend (this reader)", f"{s['backend']}{' O_DIRECT' if s['direct_io'] else ''}"),
        ("capacity", f"{cap} blocks of {fmt_bytes(s['block_size'])}"),
        ("blocks used", f"{used} ({100.0 * used / cap if cap else 0.0:.1f}%)"),
        ("blocks free", str(s["blocks_free"])),
        ("chains", f"{chains} (blocks with no parent, where matches start)"),
        (
            "reachable",
            f"{doc['reachable_blocks']} of {used} blocks"
            + (f"; {len(orphans)} orphans (a block of their chain is not on disk)" if orphans else ""),
        ),
        ("bytes used", fmt_bytes(s["bytes_used"])),
        ("bytes on disk", fmt_bytes(s["bytes_on_disk"])),
        ("tier created", fmt_time(doc["tier_created"])),
        ("oldest block", "-" if oldest is None else f"{fmt_time(oldest.created)}  {oldest.hash.hex()}"),
        ("newest block", "-" if newest is None else f"{fmt_time(newest.created)}  {newest.hash.hex()}"),
        ("last access", f"{fmt_time(s['oldest'])} .. {fmt_time(s['newest'])}"),
        ("hits", f"{doc['hits_total']} total; " + "  ".join(f"{k}: {v}" for k, v in doc["hit_histogram"].items())),
        ("checksum failures seen", str(doc["checksum_failures"])),
    ]
    for k, v in rows:
        table.add_row(k, v)
    stdout_console().print(table)


def _sorted(entries: list[Entry], sort: str) -> list[Entry]:
    if sort == "slot":
        return sorted(entries, key=lambda e: e.slot)
    if sort == "age":  # oldest first
        return sorted(entries, key=lambda e: (e.created, e.slot))
    if sort == "hits":  # most hit first
        return sorted(entries, key=lambda e: (-e.hits, e.slot))
    return entries  # "access": least recently used first, the order entries() gives


@disk.command(name="ls")
@_path_arg
@click.option("--limit", "-n", type=click.IntRange(min=0), default=None, help="Show at most N blocks.")
@click.option(
    "--sort",
    type=click.Choice(_SORTS),
    default="slot",
    show_default=True,
    help="slot; age (oldest created first); hits (most first); access (least recently used first).",
)
@json_option
@handle_errors
def ls(path: str, limit: int | None, sort: str, as_json: bool) -> None:
    """One row per block of a tier."""
    with _opened(path) as store:
        entries = store.entries()
    total = len(entries)
    shown = _sorted(entries, sort)[: limit if limit is not None else total]
    if as_json:
        emit_json({"path": os.path.abspath(path), "total": total, "blocks": [_entry_doc(e) for e in shown]})
        return
    table = Table(caption=f"{len(shown)} of {total} blocks", caption_justify="left")
    table.add_column("hash", no_wrap=True)
    table.add_column("slot", justify="right")
    table.add_column("size", justify="right")
    table.add_column("created", no_wrap=True)
    table.add_column("last access", no_wrap=True)
    table.add_column("hits", justify="right")
    for e in shown:
        table.add_row(e.hash.hex(), str(e.slot), str(e.size), fmt_time(e.created), fmt_time(e.last_access), str(e.hits))
    stdout_console().print(table)


def _summary(t: torch.Tensor) -> dict[str, Any]:
    """min / max / mean over the non-NaN values of ``t``, and its NaN and inf counts."""
    x = t.to(torch.float64).flatten()
    nan = torch.isnan(x)
    vals = x[~nan]
    if vals.numel() == 0:
        return {"min": None, "max": None, "mean": None, "nan": int(nan.sum()), "inf": 0}
    return {
        "min": finite_or_none(float(vals.min())),
        "max": finite_or_none(float(vals.max())),
        "mean": finite_or_none(float(vals.mean())),
        "nan": int(nan.sum()),
        "inf": int(torch.isinf(vals).sum()),
    }


def _part_names(outer_dim: int) -> list[str]:
    return ["K", "V"] if outer_dim == 2 else [f"part{i}" for i in range(outer_dim)]


def _read_one(store: DiskStore, key: bytes, path: str) -> tuple[Entry, tuple[str, int, int], bool, torch.Tensor]:
    """The block's entry, its ``(file, offset, size)``, whether it passed its checksum, and its data ``[L, O, P, I]``.

    A live writer may evict the block and reuse its slot while we read: the result is used only if the row
    was the same before and after the read (else we look again).
    """
    for _ in range(3):
        entry = store.lookup(key)
        location = store.block_location(key)
        if entry is None or location is None:
            break
        data, bad = store.read_blocks([entry.slot])
        again = store.lookup(key)
        if again is None or (again.slot, again.checksum) != (entry.slot, entry.checksum):
            continue
        return entry, location, not bad, data[0]
    raise CliError(f"block {key.hex()} is not in the disk tier at {path}")


def _fmt_stat(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


@disk.command()
@_path_arg
@click.argument("hash_hex", metavar="HASH")
@json_option
@handle_errors
def show(path: str, hash_hex: str, as_json: bool) -> None:
    """One block: metadata, checksum verdict, per-layer K/V statistics.

    Exits 1 when the block fails its checksum.
    """
    if not _HEX.fullmatch(hash_hex.strip()):  # before opening: bad input needs no tier
        raise CliError(f"HASH {hash_hex!r} is not hexadecimal")
    with _opened(path) as store:
        key = parse_hash(hash_hex, store.hash_algorithm)
        entry, (file, offset, size), ok, data = _read_one(store, key, path)
        model = store.model
    parts = _part_names(model.outer_dim)
    layers: list[dict[str, Any]] = []
    if ok:
        for layer in range(model.num_layers):
            row: dict[str, Any] = {"layer": layer}
            for o, name in enumerate(parts):
                row[name] = _summary(data[layer, o])
            layers.append(row)
    doc: dict[str, Any] = {
        "hash": key.hex(),
        "slot": entry.slot,
        "file": file,
        "offset": offset,
        "size": size,
        "checksum": f"{entry.checksum:016x}",
        "checksum_ok": ok,
        "verdict": "ok" if ok else "corrupt",
        "created": entry.created,
        "last_access": entry.last_access,
        "hits": entry.hits,
        "dtype": model.dtype,
        "shape": list(model.block_shape),
        "layers": layers,
    }
    if as_json:
        emit_json(doc)
    else:
        console = stdout_console()
        console.print(f"block {key.hex()}", soft_wrap=True)
        meta = Table(show_header=False)
        meta.add_column("field", style="bold")
        meta.add_column("value")
        for k, v in [
            ("file", f"{file} at offset {offset} ({size} bytes, slot {entry.slot})"),
            ("checksum", f"xxh3-64 {doc['checksum']}: {'OK' if ok else 'FAILED (data corrupt or unreadable)'}"),
            ("created", fmt_time(entry.created)),
            ("last access", fmt_time(entry.last_access)),
            ("hits", str(entry.hits)),
            ("shape", f"{model.dtype} {list(model.block_shape)} (layers, K/V, tokens, inner)"),
        ]:
            meta.add_row(k, v)
        console.print(meta)
        if ok:
            stats = Table(title="per-layer statistics", title_justify="left")
            for col in ("layer", "part", "min", "max", "mean", "NaN", "inf"):
                stats.add_column(col, justify="right")
            for row in layers:
                for name in parts:
                    st = row[name]
                    stats.add_row(
                        str(row["layer"]),
                        name,
                        _fmt_stat(st["min"]),
                        _fmt_stat(st["max"]),
                        _fmt_stat(st["mean"]),
                        str(st["nan"]),
                        str(st["inf"]),
                    )
            console.print(stats)
        else:
            console.print("per-layer statistics omitted: the data failed its checksum")
    if not ok:
        raise SystemExit(EXIT_FAILED)


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done, total)`` callback drawing a rich bar on stderr (a no-op when not enabled)."""
    bar = Progress(
        TextColumn("verifying"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=stderr_console(),
        disable=not enabled,
        transient=True,
    )
    task = bar.add_task("verify", total=None)

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    with bar:
        yield update


@disk.command()
@_path_arg
@click.option("--repair", is_flag=True, help="Drop the corrupt blocks and the orphans (needs the writer lock).")
@json_option
@handle_errors
def verify(path: str, repair: bool, as_json: bool) -> None:
    """Check every block of a tier against its checksum, and every chain for orphans.

    An orphan is a block whose parent is not on disk (or is corrupt, or an orphan itself): no match can reach
    it. Prints the corrupt and orphaned hashes. Exits 0 when the tier is clean, 1 when corrupt blocks or
    orphans were found (also when --repair dropped them), 3 when --repair cannot take the writer lock.
    """
    show_progress = stderr_console().is_terminal and not as_json
    with _opened(path, writer=repair) as store, _progress(show_progress) as progress:
        report = store.check(repair=repair, progress=progress)
    bad = [*report.corrupt, *report.out_of_range]
    out_of_range = set(report.out_of_range)
    orphans = report.orphans
    checked = report.checked + len(out_of_range)  # check() reads the rows inside the capacity, reports the others
    found = bool(bad or orphans)
    if as_json:
        emit_json(
            {
                "path": os.path.abspath(path),
                "checked": checked,
                "corrupt": [h.hex() for h in bad],
                "orphans": [h.hex() for h in orphans],
                "repaired": repair,
                "dropped": len(bad) + len(orphans) if repair else 0,
                "clean": not found,
            }
        )
    else:
        for h in bad:
            note = " (slot outside the capacity)" if h in out_of_range else ""
            click.echo(f"corrupt {h.hex()}{note}")
        for h in orphans[:_MAX_ORPHANS_LISTED]:
            click.echo(f"orphan {h.hex()}")
        if len(orphans) > _MAX_ORPHANS_LISTED:
            click.echo(f"... and {len(orphans) - _MAX_ORPHANS_LISTED} more orphans (--json lists them all)")
        what = " and ".join(
            part
            for part in (
                f"{len(bad)} corrupt" if bad else "",
                f"{len(orphans)} orphans (blocks whose parent is not on disk)" if orphans else "",
            )
            if part
        )
        if not found:
            click.echo(f"{checked} blocks checked: all good")
        elif repair:
            click.echo(f"{what} of {checked} blocks checked; dropped them, the tier is clean now")
        else:
            click.echo(f"{what} of {checked} blocks checked; run with --repair to drop them")
    raise SystemExit(EXIT_FAILED if found else EXIT_OK)


@disk.command()
@_path_arg
@json_option
@handle_errors
def compact(path: str, as_json: bool) -> None:
    """Move live blocks into the lowest slots and shrink the data files (needs the writer lock).

    Crash-safe: a crash mid-compaction loses nothing durable. Exits 3 when a server holds the writer lock.
    """
    with _opened(path, writer=True) as store:
        before = sum(os.path.getsize(os.path.join(store.root, f)) for f in os.listdir(store.root)
                     if f.startswith("data-"))
        moves = store.compact()
        after = sum(os.path.getsize(os.path.join(store.root, f)) for f in os.listdir(store.root)
                    if f.startswith("data-"))
        live = len(store)
    if as_json:
        emit_json({"path": os.path.abspath(path), "moved": len(moves), "blocks": live,
                   "bytes_before": before, "bytes_after": after})
    else:
        click.echo(f"{len(moves)} blocks moved; {live} blocks now fill the files: {fmt_bytes(before)} -> "
                   f"{fmt_bytes(after)}")
