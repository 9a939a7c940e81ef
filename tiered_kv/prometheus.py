"""Prometheus exposition of a manager's metrics (``prometheus-client``).

    from tiered_kv.prometheus import register_collector, serve_metrics
    serve_metrics(bm, port=9400)          # http://127.0.0.1:9400/metrics

Every scrape reads ``bm.metrics()``: per-tier gauges and counters labelled ``tier``, offload counters, per
tier-pair moves labelled ``pair``, and latency summaries (p50/p99) of promotions and demotions.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .manager import KvBlockManager

__all__ = ["TieredKvCollector", "register_collector", "serve_metrics"]

_TIER_COUNTERS = ("hits", "misses", "evictions", "corrupt_blocks")
_TIER_GAUGES = ("total_blocks", "available_blocks", "free_blocks", "cached_blocks", "active_blocks",
                "pinned_blocks", "usage_rate", "hit_rate", "eviction_rate")
_OFFLOAD_COUNTERS = ("demotions", "promotions", "bytes_demoted", "bytes_promoted", "dropped_demotions",
                     "failed_transfers", "corrupt_blocks", "cleaned", "shared_promotions")


class TieredKvCollector(Collector):
    """Collects one manager's metrics at scrape time."""

    def __init__(self, bm: KvBlockManager, prefix: str = "tiered_kv") -> None:
        self.bm = bm
        self.prefix = prefix

    def collect(self) -> Iterator[Any]:
        m = self.bm.metrics()
        p = self.prefix
        tiers = [t for t in ("device", "host", "disk", "remote") if t in m]
        for name in _TIER_COUNTERS:
            c = CounterMetricFamily(f"{p}_tier_{name}", f"{name} per tier", labels=["tier"])
            for t in tiers:
                if name in m[t]:
                    c.add_metric([t], float(m[t][name]))
            yield c
        for name in _TIER_GAUGES:
            g = GaugeMetricFamily(f"{p}_tier_{name}", f"{name} per tier", labels=["tier"])
            for t in tiers:
                if name in m[t]:
                    g.add_metric([t], float(m[t][name]))
            yield g
        # How long evicted blocks had stayed in each tier, and the ARC directory of tiers that use ARC.
        res = GaugeMetricFamily(f"{p}_tier_residency_seconds", "residency of evicted blocks per tier",
                                labels=["tier", "stat"])
        arc = GaugeMetricFamily(f"{p}_tier_arc", "ARC list sizes (t1, t2, b1, b2) and target p per tier",
                                labels=["tier", "list"])
        for t in tiers:
            for stat in ("mean_s", "max_s", "p50_s", "p99_s"):
                if stat in m[t].get("residency", {}):
                    res.add_metric([t, stat[:-2]], float(m[t]["residency"][stat]))
            for name in ("t1", "t2", "b1", "b2", "p"):
                if name in m[t].get("policy", {}):
                    arc.add_metric([t, name], float(m[t]["policy"][name]))
        yield res
        yield arc
        off = m["offload"]
        for name in _OFFLOAD_COUNTERS:
            yield CounterMetricFamily(f"{p}_offload_{name}", f"offload {name}", value=float(off.get(name, 0)))
        yield GaugeMetricFamily(f"{p}_offload_queue_depth", "blocks queued toward the disk tier",
                                value=float(off["queue_depth"]))
        pairs = CounterMetricFamily(f"{p}_offload_blocks_moved", "blocks moved per tier pair", labels=["pair"])
        for pair, n in off.get("per_pair", {}).items():
            pairs.add_metric([pair], float(n))
        yield pairs
        for kind in ("promote", "demote"):
            lat = off.get(f"{kind}_latency_s", {})
            g = GaugeMetricFamily(f"{p}_{kind}_latency_seconds", f"{kind} latency quantiles", labels=["quantile"])
            for q in ("p50", "p99"):
                g.add_metric([q], float(lat.get(q, 0.0)))
            yield g


def register_collector(bm: KvBlockManager, registry: CollectorRegistry | None = None) -> CollectorRegistry:
    """Register a collector for ``bm`` in ``registry`` (a new one by default) and return the registry."""
    registry = registry if registry is not None else CollectorRegistry()
    registry.register(TieredKvCollector(bm))
    return registry


def serve_metrics(bm: KvBlockManager, port: int, addr: str = "127.0.0.1") -> CollectorRegistry:
    """Serve ``bm``'s metrics over HTTP at ``http://addr:port/metrics`` from a daemon thread."""
    registry = register_collector(bm)
    start_http_server(port, addr=addr, registry=registry)
    return registry
