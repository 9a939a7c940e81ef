"""Seed 002 (PrefixCacheManager): block-level prefix caching; shared prompt prefixes are computed once.

    python examples/seed_002_prefix_cache.py
"""

from __future__ import annotations

from tiered_kv.compat import HashAlgorithm, PrefixCacheManager


def main() -> None:
    system_prompt = list(range(1000, 1064))  # 4 blocks shared by every request
    requests = [system_prompt + [i] * 40 for i in range(6)]
    with PrefixCacheManager(block_size=16, max_blocks=16, hash_algorithm=HashAlgorithm.SHA256, num_layers=2,
                            inner_dim=64, host_blocks=128) as cache:
        computed = reused = 0
        for tokens in requests:
            hashes = cache.compute_block_hashes(tokens)
            hit = cache.get_cached_blocks(hashes)
            new = cache.allocate_blocks(hashes, start_index=len(hit))
            for b in new:  # "compute" the KV of the blocks not cached
                b.layer_view(0, 0).fill_(1.0)
            computed += len(new)
            reused += len(hit)
            cache.free_blocks([b.block_id for b in hit + new])  # new blocks become cached
        stats = cache.get_stats()
        print(f"{len(requests)} requests: {reused} blocks reused, {computed} computed; "
              f"cached {stats['num_cached_blocks']} on device, hit rate {stats['hit_rate']:.0%}")


if __name__ == "__main__":
    main()
