"""Seed 001's BlockNotComplete: a block whose data was never written cannot be registered."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kvdata import SMALL, block_data, content_for, fill, hashes

from tiered_kv import (
    BlockNotComplete,
    DiskConfig,
    InvalidBlockError,
    KvBlockManager,
    KvBlockManagerConfig,
)


def test_unwritten_blocks_are_refused_and_nothing_is_registered(two_tier: KvBlockManager) -> None:
    device = two_tier.device()
    assert device is not None
    hs = hashes(2)
    blocks = device.allocate_blocks(2)
    fill(blocks[0], hs[0])
    with pytest.raises(BlockNotComplete, match=r"blocks\[1\]: device:\d+ was never written") as err:
        device.register_blocks(blocks, hs)
    assert isinstance(err.value, InvalidBlockError)  # existing handlers of misuse still catch it
    assert len(device) == 0 and not blocks[0].released  # all or nothing; the handles stay usable
    blocks[1].write(0, 1, torch.zeros(SMALL.page_size, SMALL.inner_dim))
    assert [b.written for b in blocks] == [True, True]
    device.release_blocks(device.register_blocks(blocks, hs))


def test_every_way_of_writing_counts(two_tier: KvBlockManager) -> None:
    device, host = two_tier.device(), two_tier.host()
    assert device is not None and host is not None
    hs = hashes(4)
    by_scatter = device.allocate_blocks(2)
    device.scatter(by_scatter, torch.stack([content_for(h) for h in hs[:2]]))
    registered = device.register_blocks(by_scatter, hs[:2])
    copies = host.allocate_blocks(2)  # arena -> arena copy
    two_tier.copy_blocks(registered, copies)
    host.release_blocks(host.register_blocks(copies, hs[:2]))
    device.release_blocks(registered)
    fresh = device.allocate_blocks(2)
    fill(fresh[0], hs[2])
    fill(fresh[1], hs[3])
    device.release_blocks(device.register_blocks(fresh, hs[2:]))
    # Demotion and promotion write through the internal movers: still registrable.
    two_tier.trigger_eviction("aggressive")
    two_tier.flush()
    back = two_tier.match_sequence_hashes(hs)
    assert [torch.equal(block_data(b), content_for(b.sequence_hash)) for b in back] == [True] * 4
    device.release_blocks(back)


def test_disk_tier_blocks_are_tracked_too(tmp_path: Path) -> None:
    cfg = KvBlockManagerConfig(model=SMALL, disk=DiskConfig(path=tmp_path, num_blocks=4), device_type="cpu")
    with KvBlockManager(cfg) as bm:
        disk = bm.disk()
        assert disk is not None
        hs = hashes(1)
        staged = disk.allocate_blocks(1)
        with pytest.raises(BlockNotComplete):
            disk.register_blocks(staged, hs)
        fill(staged[0], hs[0])
        disk.release_blocks(disk.register_blocks(staged, hs))
        assert len(disk) == 1
