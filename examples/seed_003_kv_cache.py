"""Seed 003 (KVCacheManager): per-request paged KV allocation, block tables and CPU swap.

    python examples/seed_003_kv_cache.py
"""

from __future__ import annotations

from tiered_kv import create_kv_cache_manager
from tiered_kv.compat import KVCacheTransfer


def main() -> None:
    with create_kv_cache_manager(num_layers=4, num_heads=2, head_dim=32, num_blocks=32, block_size=16,
                                 num_cpu_blocks=64) as mgr:
        pressure: list[float] = []
        mgr.on_memory_pressure(lambda tier, usage: pressure.append(usage), threshold=0.8)
        for r in range(3):
            mgr.allocate(f"req-{r}", num_tokens=100)
        mgr.extend("req-0", 60)
        print(f"req-0 block table (layer 0): {mgr.get_block_table('req-0', layer_idx=0)}")
        print(f"usage {mgr.usage():.0%}, free blocks {mgr.get_num_free_blocks()}, "
              f"room for 200 more tokens: {mgr.can_allocate(200)}")

        # Preemption: the request's full blocks are registered, swapped out to the CPU tier and freed on the GPU.
        device = mgr.device()
        assert device is not None
        blocks = mgr.request_blocks("req-1")[:6]
        for b in blocks:  # the "forward pass" writes each layer's K and V into the request's blocks
            for layer in range(mgr.model.num_layers):
                b.layer_view(layer, 0).fill_(0.5)
                b.layer_view(layer, 1).fill_(-0.5)
        hashes = mgr.sequence_hashes(list(range(96)))
        gpu = device.register_blocks(blocks, hashes)
        transfer = KVCacheTransfer(mgr)
        cpu = transfer.swap_out(gpu)
        assert cpu is not None
        device.release_blocks(gpu)
        mgr.free("req-1")
        back = transfer.swap_in(cpu)  # resumed later
        assert back is not None
        print(f"swapped {len(cpu)} blocks out and back in: device blocks {[b.block_id for b in back]}")
        device.release_blocks(back)
        mgr.host().release_blocks(cpu)  # type: ignore[union-attr]
        for r in (0, 2):
            mgr.free(f"req-{r}")


if __name__ == "__main__":
    main()
