"""``tiered-kv stress`` and ``tiered-kv replay``: prove under churn, crashes and failing disks that the store
neither loses nor corrupts blocks, and replay request traces for capacity planning.

The work is done in :mod:`tiered_kv.stress`; this module only parses options and prints.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from typing import Any

import click

from ..stress.options import PLANTED_BUGS, StressOptions
from ..stress.report import ProgressLine, build_report, render_table
from ..stress.workload import WorkloadShape
from . import main
from ._common import (
    EXIT_FAILED,
    CliError,
    fmt_bytes,
    handle_errors,
    stderr_console,
    stdout_console,
    writeback_option,
)

__all__ = ["stress", "replay"]


def _quiet_library(verbose: bool) -> None:
    # Injected faults make the store log every checksum failure; the report counts them instead.
    logging.getLogger("tiered_kv").setLevel(logging.INFO if verbose else logging.CRITICAL)


def _emit_line(doc: dict[str, Any]) -> None:
    """One JSON object on ONE line, the last line of stdout."""
    click.echo(json.dumps(doc, separators=(",", ":"), allow_nan=False))


@main.command("stress")
@click.option("--path", required=True, type=click.Path(file_okay=False),
              help="Scratch directory (its tier/ and journal/ are replaced).")
@click.option("--duration", default=10.0, show_default=True, type=float, help="Seconds of workload.")
@click.option("--threads", default=4, show_default=True, type=int, help="Client threads.")
@click.option("--tasks", default=2, show_default=True, type=int, help="Asyncio client tasks (one event loop).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--kill-every", type=float, default=None,
              help="Run the workload in a child process SIGKILLed about every S seconds.")
@click.option("--faults", default=0.0, show_default=True, type=float,
              help="Rate of injected disk faults (EIO, ENOSPC, torn writes, bit flips).")
@click.option("--device-blocks", default=32, show_default=True, type=int)
@click.option("--host-blocks", default=64, show_default=True, type=int)
@click.option("--disk-blocks", default=None, type=int,
              help="Disk tier size in blocks [default: 1024; 4096 with --kill-every].")
@click.option("--num-layers", default=2, show_default=True, type=int)
@click.option("--inner-dim", default=64, show_default=True, type=int)
@click.option("--page-size", default=16, show_default=True, type=int, help="Tokens per block.")
@click.option("--dtype", default="float16", show_default=True)
@click.option("--eviction", default="arc", show_default=True)
@click.option("--durability", default="batch", show_default=True, type=click.Choice(["sync", "batch", "none"]))
@click.option("--conversations", default=200, show_default=True, type=int)
@click.option("--zipf", default=1.1, show_default=True, type=float, help="Zipf exponent over conversations.")
@click.option("--system-prompts", default=4, show_default=True, type=int)
@click.option("--system-blocks", default=8, show_default=True, type=int, help="Blocks of each shared system prompt.")
@click.option("--turn-blocks", default=2, show_default=True, type=int, help="Blocks each turn adds.")
@click.option("--max-context-blocks", default=24, show_default=True, type=int)
@click.option("--document-rate", default=0.05, show_default=True, type=float, help="Fraction of one-time documents.")
@click.option("--document-blocks", default=16, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line of stdout.")
@click.option("--progress/--no-progress", default=None, help="Live progress line on stderr [default: when a terminal].")
@click.option("--verbose", is_flag=True, help="Show the store's own log messages.")
@click.option("--plant-bug", type=click.Choice(PLANTED_BUGS), default=None, hidden=True)
@handle_errors
def stress(
    path: str, duration: float, threads: int, tasks: int, seed: int, kill_every: float | None, faults: float,
    device_blocks: int, host_blocks: int, disk_blocks: int | None, num_layers: int, inner_dim: int, page_size: int,
    dtype: str, eviction: str, durability: str, conversations: int, zipf: float, system_prompts: int,
    system_blocks: int, turn_blocks: int, max_context_blocks: int, document_rate: float, document_blocks: int,
    as_json: bool, progress: bool | None, verbose: bool, plant_bug: str | None,
) -> None:
    """Offload stress run: churn through every tier and verify every block; exit 1 if any was lost or wrong."""
    from ..stress.crash import run_with_kills
    from ..stress.runner import run_in_process

    _quiet_library(verbose)
    shape = WorkloadShape(
        conversations=conversations, zipf=zipf, system_prompts=system_prompts, system_blocks=system_blocks,
        turn_blocks=turn_blocks, max_context_blocks=max_context_blocks, document_rate=document_rate,
        document_blocks=document_blocks,
    )
    opts = StressOptions(
        path=path, duration=duration, threads=threads, tasks=tasks, seed=seed, kill_every=kill_every,
        faults=faults, device_blocks=device_blocks, host_blocks=host_blocks, disk_blocks=disk_blocks,
        num_layers=num_layers, inner_dim=inner_dim, page_size=page_size, dtype=dtype, eviction=eviction,
        durability=durability, shape=shape, plant_bug=plant_bug,
    )
    if os.path.exists(path) and not os.path.isdir(path):
        raise CliError(f"--path {path} is not a directory")
    for sub in ("tier", "journal"):  # a stress run starts from an empty tier
        shutil.rmtree(os.path.join(path, sub), ignore_errors=True)
    line = ProgressLine(enabled=progress)
    try:
        result = run_with_kills(opts, line) if kill_every is not None else run_in_process(opts, line)
    finally:
        line.finish()
    report = build_report(opts, result)
    if as_json:
        _emit_line(report)
    else:
        render_table(report, stdout_console())
    if not report["ok"]:
        sys.exit(EXIT_FAILED)


@main.command("replay")
@click.argument("trace", required=False, type=click.Path(dir_okay=False))
@click.option("--path", type=click.Path(file_okay=False), default=None,
              help="Disk tier directory [default: a temporary one].")
@click.option("--device-blocks", default=512, show_default=True, type=int)
@click.option("--host-blocks", default=2048, show_default=True, type=int)
@click.option("--disk-blocks", default=8192, show_default=True, type=int)
@click.option("--page-size", default=128, show_default=True, type=int, help="Tokens per store block (divides 512).")
@click.option("--num-layers", default=2, show_default=True, type=int)
@click.option("--inner-dim", default=16, show_default=True, type=int)
@click.option("--dtype", default="float16", show_default=True)
@click.option("--eviction", default="arc", show_default=True)
@click.option("--limit", type=int, default=None, help="Replay only the first N requests.")
@writeback_option
@click.option("--verify/--no-verify", default=True, show_default=True, help="Check the bytes of every returned block.")
@click.option("--generate", "generate", type=click.Path(dir_okay=False), default=None,
              help="Write a synthetic trace to this file and exit.")
@click.option("--requests", default=1000, show_default=True, type=int, help="With --generate: number of requests.")
@click.option("--seed", default=0, show_default=True, type=int, help="With --generate: seed.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line of stdout.")
@click.option("--verbose", is_flag=True, help="Show the store's own log messages.")
@handle_errors
def replay(
    trace: str | None, path: str | None, device_blocks: int, host_blocks: int, disk_blocks: int, page_size: int,
    num_layers: int, inner_dim: int, dtype: str, eviction: str, limit: int | None, writeback_s: float | None,
    verify: bool, generate: str | None, requests: int, seed: int, as_json: bool, verbose: bool,
) -> None:
    """Replay a Mooncake-format JSONL trace through the store: hit rates per tier and bytes moved."""
    from ..stress.replay import ReplayOptions, replay_trace
    from ..stress.tracegen import generate_trace

    _quiet_library(verbose)
    if generate is not None:
        n = generate_trace(generate, requests, seed=seed)
        if as_json:
            _emit_line({"generated": generate, "requests": n})
        else:
            click.echo(f"wrote {n} requests to {generate}")
        return
    if trace is None:
        raise CliError("missing TRACE (or --generate OUT)")
    if not os.path.isfile(trace):
        raise CliError(f"no trace file {trace}")
    opts = ReplayOptions(
        path=path, device_blocks=device_blocks, host_blocks=host_blocks, disk_blocks=disk_blocks,
        page_size=page_size, num_layers=num_layers, inner_dim=inner_dim, dtype=dtype, eviction=eviction,
        limit=limit, verify=verify, writeback_s=writeback_s,
    )
    err = stderr_console()
    show = sys.stderr.isatty() and not as_json

    def progress(n: int, counts: dict[str, Any]) -> None:
        if show:
            hit = counts["hits"] / counts["blocks"] if counts["blocks"] else 0.0
            err.print(f"\r{n} requests, prefix hit rate {hit:.1%}", end="")

    try:
        report = replay_trace(trace, opts, progress)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    if show:
        err.print()
    if as_json:
        _emit_line(report)
    else:
        _render_replay(report)
    if not report["ok"]:
        sys.exit(EXIT_FAILED)


def _render_replay(report: dict[str, Any]) -> None:
    from rich.table import Table

    cfg = report["config"]
    table = Table(title=f"tiered-kv replay {report['trace']}", header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("requests / blocks", f"{report['requests']} / {report['blocks']} ({report['tokens']} tokens)"),
        ("tiers (blocks)", f"device {cfg['device_blocks']}, host {cfg['host_blocks']}, disk {cfg['disk_blocks']}"),
        ("tiers (bytes)", f"device {fmt_bytes(cfg['device_bytes'])}, host {fmt_bytes(cfg['host_bytes'])}, "
                          f"disk {fmt_bytes(cfg['disk_bytes'])}"),
        ("prefix hit rate", f"{report['prefix_hit_rate']:.1%} (unlimited cache: {report['ideal_hit_rate']:.1%})"),
        ("blocks served from", " ".join(f"{t}={n}" for t, n in report["served_from"].items())),
        ("hit rate per tier", " ".join(f"{t}={r:.1%}" for t, r in report["hit_rate"].items())),
        ("promoted / demoted", f"{fmt_bytes(report['bytes_promoted'])} / {fmt_bytes(report['bytes_demoted'])}"),
        ("disk written / read", f"{fmt_bytes(report['bytes_written_disk'])} / {fmt_bytes(report['bytes_read_disk'])}"),
        ("disk write amplification", "n/a" if report["disk_write_amplification"] is None else
         f"x{report['disk_write_amplification']:.2f} (bytes written to disk / {fmt_bytes(report['bytes_registered'])}"
         f" registered; writeback_s {cfg['writeback_s']})"),
        ("blocks verified / wrong", f"{report['blocks_verified']} / {report['wrong']}"),
        ("elapsed", f"{report['elapsed_s']:.1f} s ({report['requests_per_s']:.0f} requests/s)"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    stdout_console().print(table)
