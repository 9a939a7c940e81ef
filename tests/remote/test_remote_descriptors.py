"""Seed 004's remote block access: publish blocks, hand descriptors to a peer, read or copy them by descriptor."""

from __future__ import annotations

import pytest
import torch
from kvdata import SMALL, block_data, content_for, store

from tiered_kv import (
    ConfigError,
    InvalidBlockError,
    KvBlockManager,
    KvBlockManagerConfig,
    LayoutConfig,
    LayoutMismatchError,
    NotEnoughBlocksAvailable,
)
from tiered_kv.config import RemoteConfig
from tiered_kv.peers import BlockDescriptor

from .redis_servers import RedisServer


def manager(url: str, worker: str, namespace: str, device_blocks: int = 4) -> KvBlockManager:
    return KvBlockManager(KvBlockManagerConfig(
        model=SMALL, device=LayoutConfig(num_blocks=device_blocks), host=LayoutConfig(num_blocks=4),
        remote=RemoteConfig(url=url, mode="write_back"), namespace=namespace, worker_id=worker, device_type="cpu"))


def test_a_peer_reads_and_copies_published_blocks(shared_server: RedisServer) -> None:
    with manager(shared_server.url, "a", "desc") as a, manager(shared_server.url, "b", "desc", 2) as b:
        hs = a.sequence_hashes(list(range(16)))
        store(a, hs)  # 4 blocks in a's device tier, nothing remote yet (write-back)
        assert a.metrics()["remote"]["writes"] == 0
        wire = BlockDescriptor.pack_many(a.export_block_descriptors(hs))
        descriptors = BlockDescriptor.unpack_many(wire)
        assert [d.worker_id for d in descriptors] == ["a"] * 4 and [d.sequence_hash for d in descriptors] == hs

        read = b.get_remote_blocks_immutable(descriptors[::-1])  # any order, not a prefix
        assert [r.sequence_hash for r in read] == hs[::-1]
        assert all(torch.equal(block_data(r), content_for(r.sequence_hash)) for r in read)
        assert b.device().available_blocks() == 2  # type: ignore[union-attr]  # no local slot taken

        with pytest.raises(NotEnoughBlocksAvailable):
            b.get_remote_blocks_mutable(descriptors)  # 4 blocks, b's device tier has 2
        mine = b.get_remote_blocks_mutable(descriptors[2:])
        assert [m.tier for m in mine] == ["device", "device"]
        assert all(torch.equal(block_data(m), content_for(h)) for m, h in zip(mine, hs[2:]))
        mine[0].layer_view(0, 0).fill_(7.0)  # mutable: b's own copy
        registered = b.device().register_blocks(mine, hs[2:])  # type: ignore[union-attr]
        b.device().release_blocks(registered)  # type: ignore[union-attr]


def test_unavailable_or_foreign_descriptors_are_refused(shared_server: RedisServer) -> None:
    with manager(shared_server.url, "a", "desc2") as a, manager(shared_server.url, "c", "other") as c:
        hs = a.sequence_hashes(list(range(8)))
        store(a, hs)
        published = a.export_block_descriptors(hs[:1])
        never = BlockDescriptor("a", hs[1], SMALL.fingerprint(), "desc2")
        with pytest.raises(InvalidBlockError, match=r"descriptors\[1\].*not in the remote tier"):
            a.get_remote_blocks_immutable([published[0], never])
        with pytest.raises(LayoutMismatchError, match="other"):
            c.get_remote_blocks_immutable(published)
        with pytest.raises(InvalidBlockError, match="not held"):
            a.export_block_descriptors([c.sequence_hashes(list(range(4)))[0][::-1]])
        with pytest.raises(ValueError, match="BlockDescriptor"):
            BlockDescriptor.unpack_many(b"\x01not msgpack")


def test_without_a_remote_tier(two_tier: KvBlockManager) -> None:
    with pytest.raises(ConfigError, match="remote"):
        two_tier.get_remote_blocks_immutable([])
