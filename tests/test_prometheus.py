"""Prometheus exposition over a real HTTP scrape."""

from __future__ import annotations

import socket
import urllib.request

from kvdata import fill

from tiered_kv import KvBlockManager
from tiered_kv.prometheus import serve_metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_scrape(two_tier: KvBlockManager) -> None:
    bm = two_tier
    hs = bm.sequence_hashes(list(range(4 * 6)))
    for i in range(0, 6, 2):
        blocks = bm.top.allocate_blocks(2)
        for b, h in zip(blocks, hs[i : i + 2]):
            fill(b, h)
        bm.top.release_blocks(bm.top.register_blocks(blocks, hs[i : i + 2]))
    bm.top.release_blocks(bm.match_sequence_hashes(hs))
    port = _free_port()
    serve_metrics(bm, port)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'tiered_kv_tier_total_blocks{tier="device"} 4.0' in text
    assert 'tiered_kv_tier_hits_total{tier="host"}' in text
    assert "tiered_kv_offload_demotions_total" in text
    assert 'tiered_kv_offload_blocks_moved_total{pair="device->host"}' in text
