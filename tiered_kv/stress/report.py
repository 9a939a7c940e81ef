"""Turning a run's numbers into the report: one JSON-able dict, a rich table, and the live progress line."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table

from .options import StressOptions
from .runner import RunResult
from .stats import Stats

__all__ = ["build_report", "render_table", "ProgressLine", "sum_metrics", "TIERS"]

TIERS = ("device", "host", "disk")
_OFFLOAD_KEYS = ("demotions", "promotions", "bytes_demoted", "bytes_promoted", "dropped_demotions",
                 "failed_transfers", "corrupt_blocks")


def sum_metrics(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Add up the counters of several ``bm.metrics()`` snapshots (one per process life)."""
    out: dict[str, Any] = {t: {"hits": 0, "misses": 0, "evictions": 0, "corrupt_blocks": 0} for t in TIERS}
    out["offload"] = dict.fromkeys(_OFFLOAD_KEYS, 0)
    out["offload"]["queue_depth"] = 0
    for m in parts:
        for t in TIERS:
            for k in ("hits", "misses", "evictions", "corrupt_blocks"):
                out[t][k] += int(m.get(t, {}).get(k, 0))
        for k in _OFFLOAD_KEYS:
            out["offload"][k] += int(m.get("offload", {}).get(k, 0))
        out["offload"]["queue_depth"] = int(m.get("offload", {}).get("queue_depth", 0))
    for t in TIERS:
        looked = out[t]["hits"] + out[t]["misses"]
        out[t]["hit_rate"] = out[t]["hits"] / looked if looked else 0.0
    return out


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 4)


def build_report(opts: StressOptions, result: RunResult) -> dict[str, Any]:
    """The run's report (the ``--json`` document); ``ok`` is False when anything was wrong or lost."""
    s = result.stats
    m = sum_metrics([result.metrics])
    off = m["offload"]
    elapsed = max(result.elapsed, 1e-9)
    requested = s["blocks_requested"]
    detected = {
        # Per-pool counts: each block dropped for a bad checksum once. (The offload entry's corrupt_blocks counts
        # a block found corrupt during a promotion twice, once from the pool and once from the scheduler.)
        "corrupt_blocks": sum(m[t]["corrupt_blocks"] for t in TIERS),
        "failed_transfers": off["failed_transfers"],
        "errors": s["errors"],
        "reopen_corrupt": result.detected_extra,
    }
    return {
        "ok": s["wrong"] == 0 and s["lost"] == 0 and s["client_failures"] == 0 and s["not_prefix_closed"] == 0,
        "mode": "kill" if opts.kill_every is not None else "in-process",
        "duration_s": round(result.elapsed, 3),
        "ops": s["ops"],
        "throughput_ops_s": round(s["ops"] / elapsed, 1),
        "blocks_per_s": round((s["blocks_matched"] + s["blocks_allocated"]) / elapsed, 1),
        "blocks_requested": requested,
        "blocks_matched": s["blocks_matched"],
        "blocks_allocated": s["blocks_allocated"],
        "blocks_verified": s["blocks_verified"],
        "verified_per_tier": {t: s["verified_" + t] for t in TIERS},
        "wrong": s["wrong"],
        "lost": s["lost"],
        "unreachable": s["unreachable"],
        "not_prefix_closed": s["not_prefix_closed"],
        "crashes": result.crashes,
        "faults_injected": result.faults_injected,
        "faults_detected": sum(detected.values()),
        "faults_detected_detail": detected,
        "hit_rate": {t: round(m[t]["hit_rate"], 4) for t in TIERS},
        "prefix_hit_rate": round(s["blocks_matched"] / requested, 4) if requested else 0.0,
        "demotions": off["demotions"],
        "promotions": off["promotions"],
        "bytes_demoted": off["bytes_demoted"],
        "bytes_promoted": off["bytes_promoted"],
        "dropped_demotions": off["dropped_demotions"],
        "evictions": {t: m[t]["evictions"] for t in TIERS},
        "match_p50_ms": _ms(s.match_latency.quantile(0.5)),
        "match_p99_ms": _ms(s.match_latency.quantile(0.99)),
        "allocate_p50_ms": _ms(s.allocate_latency.quantile(0.5)),
        "allocate_p99_ms": _ms(s.allocate_latency.quantile(0.99)),
        "backpressure": s["backpressure"],
        "client_failures": s["client_failures"],
        "documents": s["documents"],
        "lives": result.lives,
        "examples": result.examples[:10],
        "config": {
            "threads": opts.threads,
            "tasks": opts.tasks,
            "seed": opts.seed,
            "kill_every": opts.kill_every,
            "faults": opts.faults,
            "device_blocks": opts.device_blocks,
            "host_blocks": opts.host_blocks,
            "disk_blocks": opts.disk_capacity,
            "block_bytes": opts.model().block_size_bytes,
            "page_size": opts.page_size,
            "plant_bug": opts.plant_bug,
        },
    }


def render_table(report: dict[str, Any], console: Console) -> None:
    """Print the report as a rich table."""
    table = Table(title="tiered-kv stress", show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    verdict = "[green]PASS[/green]" if report["ok"] else "[red]FAIL[/red]"
    rows: list[tuple[str, str]] = [
        ("verdict", verdict),
        ("mode", str(report["mode"])),
        ("duration", f"{report['duration_s']:.1f} s"),
        ("ops", f"{report['ops']} ({report['throughput_ops_s']:.0f}/s)"),
        ("blocks verified", f"{report['blocks_verified']} "
                            + " ".join(f"{t}={n}" for t, n in report["verified_per_tier"].items())),
        ("wrong", str(report["wrong"])),
        ("lost", str(report["lost"])),
        ("crashes", str(report["crashes"])),
        ("faults injected / detected", f"{report['faults_injected']} / {report['faults_detected']}"),
        ("hit rate", " ".join(f"{t}={r:.1%}" for t, r in report["hit_rate"].items())),
        ("prefix hit rate", f"{report['prefix_hit_rate']:.1%}"),
        ("demotions / promotions", f"{report['demotions']} / {report['promotions']}"),
        ("dropped demotions", str(report["dropped_demotions"])),
        ("match p50 / p99", f"{report['match_p50_ms']:.3f} / {report['match_p99_ms']:.3f} ms"),
        ("allocate p50 / p99", f"{report['allocate_p50_ms']:.3f} / {report['allocate_p99_ms']:.3f} ms"),
        ("backpressure", str(report["backpressure"])),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    for line in report["examples"]:
        console.print(f"[red]{line}[/red]")


class ProgressLine:
    """A one-line live status on a terminal (rewritten in place); silent when the stream is not a terminal.

    Args:
        stream: where to write (stderr by default, so stdout stays clean for ``--json``).
        enabled: force on or off (default: when ``stream`` is a terminal).
    """

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._last = 0.0
        self._width = 0

    def __call__(self, elapsed: float, stats: Stats, metrics: dict[str, Any], crashes: int) -> None:
        """Redraw the line (at most 4 times a second)."""
        now = time.monotonic()
        if not self.enabled or now - self._last < 0.25:
            return
        self._last = now
        rates = " ".join(f"{t.replace('device', 'dev')} {metrics.get(t, {}).get('hit_rate', 0.0):4.0%}" for t in TIERS)
        depth = metrics.get("offload", {}).get("queue_depth", 0)
        text = (f"[{elapsed:6.1f}s] ops {stats['ops']} ({stats['ops'] / max(elapsed, 1e-9):.0f}/s)  hit {rates}  "
                f"queue {depth}  verified {stats['blocks_verified']}  wrong {stats['wrong']}  lost {stats['lost']}  "
                f"crashes {crashes}")
        pad = max(0, self._width - len(text))
        self._width = len(text)
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()

    def finish(self) -> None:
        """End the line."""
        if self.enabled and self._width:
            self.stream.write("\n")
            self.stream.flush()
