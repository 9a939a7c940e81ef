"""Seed 001 (Block Pool guide): memory-pressure eviction modes and a should_evict(block) policy.

    python examples/seed_001_eviction.py
"""

from __future__ import annotations

import torch

from tiered_kv import KvBlockManager, KvBlockManagerConfig, LayoutConfig, ModelConfig
from tiered_kv.compat import BlockMetadata, EvictionMode, register_eviction_policy


class EvictLowPriority:
    """The seed's policy trait: blocks marked with a negative priority go first (then least recently used)."""

    def should_evict(self, block: BlockMetadata) -> bool:
        return block.priority < 0


def main() -> None:
    register_eviction_policy("low-priority-first", EvictLowPriority())
    model = ModelConfig(num_layers=2, inner_dim=64, page_size=16)
    config = KvBlockManagerConfig(model=model, device=LayoutConfig(num_blocks=8), host=LayoutConfig(num_blocks=32),
                                  eviction="low-priority-first")
    with KvBlockManager(config) as bm:
        device = bm.device()
        assert device is not None
        hashes = bm.sequence_hashes(list(range(16 * 8)))
        blocks = device.allocate_blocks(8)
        for b in blocks:
            b.write(0, 0, torch.zeros(16, 64, dtype=model.torch_dtype))
        device.release_blocks(device.register_blocks(blocks, hashes))
        device.policy.set_priority(hashes[5], -1)  # type: ignore[attr-defined]  # e.g. a speculative branch

        # A NORMAL pass frees a quarter of the tier: the low-priority block first, then least recently used.
        evicted = device.trigger_eviction(EvictionMode.NORMAL)
        print(f"normal eviction freed {evicted} blocks: low-priority block {hashes[5] not in device}, "
              f"LRU block {hashes[0] not in device}, others kept {all(h in device for h in hashes[1:5])}")
        # The seed's pressure handler. usage_rate() counts held blocks only (cached ones can be evicted at any
        # time), so the occupancy that calls for cleaning ahead is the share of slots that are not free.
        occupied = 1 - device.stats()["free_blocks"] / device.total_blocks()
        if occupied > 0.7:
            mode = EvictionMode.AGGRESSIVE if occupied > 0.9 else EvictionMode.NORMAL
            print(f"occupancy {occupied:.0%}: {mode.value} eviction freed {device.trigger_eviction(mode)} more")
        bm.flush()
        host = bm.host()
        assert host is not None
        evicted = [h for h in hashes if h not in device]
        print(f"{len(evicted)} evicted blocks all demoted to the host tier: {all(h in host for h in evicted)}")


if __name__ == "__main__":
    main()
