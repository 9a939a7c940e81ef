"""The remote tier inside KvBlockManager: write-through, write-back, sharing between processes, failures."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from kvdata import SMALL, block_data, content_for, fill, store

from tiered_kv import (
    KvBlockManager,
    KvBlockManagerConfig,
    LayoutConfig,
    LayoutMismatchError,
    ModelConfig,
)
from tiered_kv.config import RemoteConfig

from .redis_servers import RedisCluster, RedisServer

TESTS = Path(__file__).resolve().parents[1]


def manager(url: str | list[str], mode: str = "write_through", namespace: str = "t", **kw: object) -> KvBlockManager:
    args: dict = {
        "model": SMALL,
        "device": LayoutConfig(num_blocks=4),
        "host": LayoutConfig(num_blocks=4),
        "remote": RemoteConfig(url=url, mode=mode, timeout=0.5),
        "namespace": namespace,
        "device_type": "cpu",
    }
    args.update(kw)
    return KvBlockManager(KvBlockManagerConfig(**args))


def test_two_processes_share_prefixes_write_through(shared_server: RedisServer) -> None:
    with manager(shared_server.url, namespace="share") as bm:
        hs = bm.sequence_hashes(list(range(4 * 4)))
        store(bm, hs)
        bm.flush()
        assert bm.metrics()["remote"]["writes"] == 4
    code = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(TESTS)!r})
        from kvdata import SMALL, block_data, content_for
        from tiered_kv import KvBlockManager, KvBlockManagerConfig, LayoutConfig
        from tiered_kv.config import RemoteConfig
        cfg = KvBlockManagerConfig(model=SMALL, device=LayoutConfig(num_blocks=8), namespace="share",
                                   remote=RemoteConfig(url={shared_server.url!r}), device_type="cpu")
        with KvBlockManager(cfg) as bm:
            got = bm.match_sequence_hashes(bm.sequence_hashes(list(range(16))))
            assert all(b.tier == "device" for b in got)
            assert all(torch.equal(block_data(b), content_for(b.sequence_hash)) for b in got)
            print(len(got), bm.metrics()["remote"]["hits"])
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["4", "4"]


def test_write_back_receives_victims_of_the_lowest_tier(shared_server: RedisServer) -> None:
    with manager(shared_server.url, mode="write_back", namespace="wb") as bm:
        hs = bm.sequence_hashes(list(range(4 * 12)))
        store(bm, hs)  # 12 blocks through 4 device + 4 host: host victims go to Redis
        bm.flush()
        assert bm.metrics()["remote"]["writes"] >= 4
        got = bm.match_sequence_hashes(hs)
        assert [b.sequence_hash for b in got] == hs[:4]
        for b in got:
            assert torch.equal(block_data(b), content_for(b.sequence_hash))
        bm.top.release_blocks(got)
        assert bm.metrics()["remote"]["hits"] >= 1
        view = bm.remote()
        assert view is not None and view.contains(hs[:1]) == [True]


def test_corrupt_remote_value_is_a_miss(shared_server: RedisServer) -> None:
    with manager(shared_server.url, namespace="corrupt", host=None) as bm:
        hs = bm.sequence_hashes(list(range(4 * 2)))
        store(bm, hs)
        bm.flush()
        assert bm._remote is not None
        client = shared_server.client()
        key = bm._remote.store.key(hs[0])
        value = bytearray(client.get(key))
        value[-1] ^= 0xFF
        client.set(key, bytes(value))
        bm.reset()
        assert bm.match_sequence_hashes(hs) == []
        assert bm.metrics()["offload"]["corrupt_blocks"] >= 1


def test_unreachable_remote_is_a_fast_miss() -> None:
    with manager("redis://127.0.0.1:1", namespace="dead", host=None) as bm:
        hs = bm.sequence_hashes(list(range(8)))
        store(bm, hs)
        bm.reset()
        t0 = time.monotonic()
        assert bm.match_sequence_hashes(hs) == []
        assert time.monotonic() - t0 < 5.0  # no hang; generous for a loaded CI machine
        bm.flush()
        assert bm.metrics()["remote"]["dropped_writes"] >= 1


def test_cluster_round_trip(shared_cluster: RedisCluster) -> None:
    with manager(shared_cluster.urls, namespace="cl", host=None, device=LayoutConfig(num_blocks=64)) as bm:
        hs = bm.sequence_hashes(list(range(4 * 40)))
        for i in range(0, 40, 8):
            blocks = bm.top.allocate_blocks(8)
            for b, h in zip(blocks, hs[i : i + 8]):
                fill(b, h)
            bm.top.release_blocks(bm.top.register_blocks(blocks, hs[i : i + 8]))
        bm.flush()
        bm.reset()
        got = bm.match_sequence_hashes(hs)
        assert len(got) == 40
        assert all(torch.equal(block_data(b), content_for(b.sequence_hash)) for b in got)
        bm.top.release_blocks(got)


def test_blockset_export_import(shared_server: RedisServer) -> None:
    with manager(shared_server.url, namespace="bs") as a, manager(shared_server.url, namespace="bs") as b:
        hs = a.sequence_hashes(list(range(4 * 3)))
        store(a, hs)
        peer = b.import_remote_blockset(a.export_local_blockset())
        assert peer == a.worker_id
        assert b.peer_holders(hs) == {a.worker_id: 3}
    other = ModelConfig(num_layers=3, inner_dim=8, page_size=4, dtype="float32")
    with manager(shared_server.url, namespace="bs") as a, manager(shared_server.url, namespace="bs",
                                                                   model=other) as b:
        with pytest.raises(LayoutMismatchError, match="fingerprint"):
            b.import_remote_blockset(a.export_local_blockset())
        with pytest.raises(ValueError, match="blockset"):
            b.import_remote_blockset(b"\x00not msgpack")


def test_remote_hits_check_the_expected_tokens(shared_server: RedisServer) -> None:
    # A block registered with its token ids carries them to Redis; another node matching the same hashes with other
    # token ids (a collision, accidental or crafted) misses instead of getting someone else's KV.
    tokens = list(range(4 * 3))
    with manager(shared_server.url, namespace="tokens") as writer:
        hs = writer.sequence_hashes(tokens)
        blocks = writer.top.allocate_blocks(3)
        for b, h in zip(blocks, hs):
            fill(b, h)
        per_block = [tokens[i * 4 : (i + 1) * 4] for i in range(3)]
        writer.top.release_blocks(writer.top.register_blocks(blocks, hs, per_block))
        writer.flush()
        view = writer.remote()
        assert view is not None and view.contains(hs) == [True] * 3
    with manager(shared_server.url, namespace="tokens") as reader:
        forged = [*tokens[:4], 7, 7, 7, 7, *tokens[8:]]
        got = reader.match_sequence_hashes(hs, tokens=forged)
        assert [b.sequence_hash for b in got] == hs[:1]  # the second block's stored tokens differ: the run ends
        reader.top.release_blocks(got)
        reader.reset()
        got = reader.match_sequence_hashes(hs, tokens=tokens)
        assert [b.sequence_hash for b in got] == hs
        assert all(torch.equal(block_data(b), content_for(b.sequence_hash)) for b in got)
        m = reader.metrics()
        assert m["remote"]["hits"] >= 3 and m["device"]["hits"] == 0  # counted where they were found
        reader.top.release_blocks(got)
