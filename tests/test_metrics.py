"""Latency recorders and the percentile rule of tiered_kv.metrics."""

from __future__ import annotations

import math

from tiered_kv.metrics import LatencyHistogram, PoolMetrics, RecentLatencies, percentile


def test_percentile_is_the_nearest_rank_below() -> None:
    assert percentile([], 50) == 0.0
    ordered = [float(i) for i in range(1, 101)]  # 1..100
    assert (percentile(ordered, 0), percentile(ordered, 50), percentile(ordered, 99), percentile(ordered, 100)) == (
        1.0,
        51.0,
        100.0,
        100.0,
    )
    assert percentile([0.5], 99) == 0.5


def test_recent_latencies_keep_the_newest_and_report_exact_percentiles() -> None:
    lat = RecentLatencies(keep=4)
    assert lat.percentiles(50, 99) == (0.0, 0.0)
    for s in (9.0, 9.0, 1.0, 2.0, 3.0, 4.0):  # the two 9s drop out
        lat.observe(s)
    assert len(lat) == 4 and lat.percentiles(50, 99) == (3.0, 4.0)


def test_latency_histogram_quantiles_are_bucket_upper_bounds() -> None:
    h = LatencyHistogram()
    assert h.summary() == {"count": 0, "mean": 0.0, "p50": 0.0, "p99": 0.0}
    for _ in range(99):
        h.observe(1e-3)  # exactly a bound: counted in that bucket
    h.observe(100.0)  # past the last bound
    s = h.summary()
    assert s["count"] == 100 and math.isclose(s["mean"], (99e-3 + 100.0) / 100)
    assert math.isclose(s["p50"], 1e-3) and math.isclose(s["p99"], 1e-3)
    assert h.quantile(1.0) == math.inf


def test_pool_residency_uses_the_same_percentile_rule() -> None:
    m = PoolMetrics("host")
    m.note_stored(range(10))
    m.record_evictions([(bytes([i]) * 32, i) for i in range(10)], "capacity")
    r = m.residency()
    recent = sorted(m._residencies)
    assert r["count"] == 10 and r["p50_s"] == percentile(recent, 50) == recent[5] and r["p99_s"] == recent[9]
