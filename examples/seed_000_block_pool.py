"""Seed 000 (BlockPoolManager): vLLM-style block pool calls by integer id, with a host tier underneath.

    python examples/seed_000_block_pool.py
"""

from __future__ import annotations

from tiered_kv.compat import BlockPool, BlockPoolConfig, EvictionMode, KVCacheMetricsCollector, compute_block_hash


def main() -> None:
    config = BlockPoolConfig(num_blocks=8, block_size=16, num_layers=2, inner_dim=64, host_blocks=64)
    with BlockPool(config) as pool:
        metrics = KVCacheMetricsCollector(pool)
        keys = [compute_block_hash(f"document chunk {i}".encode()) for i in range(24)]
        for start in range(0, len(keys), 4):  # three "requests" worth of blocks through an 8-block pool
            blocks = pool.get_new_blocks(4)
            for b, k in zip(blocks, keys[start : start + 4]):
                b.layer_view(0, 0).fill_(float(k[0]))  # the "KV" of this block
            cached = pool.cache_blocks([b.block_id for b in blocks], keys[start : start + 4])
            pool.free_blocks([b.block_id for b in cached])  # done: cached and evictable

        hit = pool.lookup_cached_block(keys[0])  # evicted long ago, found in the host tier, promoted back
        assert hit is not None
        pool.touch([hit.block_id])  # a prefix hit: take a reference
        value = float(hit.layer_view(0, 0)[0, 0])
        print(f"block {keys[0].hex()[:12]} is back as device block {hit.block_id}, data intact: "
              f"{value == float(keys[0][0])}")
        pool.pin_blocks([hit.block_id])
        pool.free_blocks([hit.block_id])
        print(f"aggressive eviction freed {pool.trigger_eviction(EvictionMode.AGGRESSIVE)} blocks; pinned one stays")
        pool.unpin_blocks([hit.block_id])
        stats = pool.get_stats()
        print(f"evictions {stats['evictions']}, eviction rate {metrics.get_eviction_rate(60):.2f}/s, "
              f"mean residency {stats['residency']['mean_s'] * 1e3:.2f} ms, ARC {stats['policy']}")


if __name__ == "__main__":
    main()
